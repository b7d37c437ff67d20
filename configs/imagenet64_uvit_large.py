"""Paper config imagenet64_uvit_large (see configs/paper.py for the arguments: runlocal, ...)."""

from configs.paper import paper_config


def get_config(arg: str = ""):
    return paper_config("imagenet64_uvit_large", arg)
