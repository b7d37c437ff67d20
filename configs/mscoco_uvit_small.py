"""Paper config mscoco_uvit_small (arguments: runlocal, deep; see configs/paper.py)."""

from configs.paper import paper_config


def get_config(arg: str = ""):
    return paper_config("mscoco_uvit_small", arg)
