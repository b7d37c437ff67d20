"""Paper config imagenet256_uvit_huge (see configs/paper.py for the arguments: runlocal, ...)."""

from configs.paper import paper_config


def get_config(arg: str = ""):
    return paper_config("imagenet256_uvit_huge", arg)
