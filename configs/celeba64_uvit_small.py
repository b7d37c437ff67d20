"""Paper config celeba64_uvit_small (see configs/paper.py for the arguments: runlocal, ...)."""

from configs.paper import paper_config


def get_config(arg: str = ""):
    return paper_config("celeba64_uvit_small", arg)
