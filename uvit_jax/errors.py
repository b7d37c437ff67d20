"""The errors a user can fix: `main.py` prints their message alone and exits 2 (`EXPECTED`).

Everything else is a bug and keeps its traceback.
"""

from input_pipeline.errors import DataError


class UserError(Exception):
    """An expected failure (a config field, a checkpoint, a dataset, a weights file, a locked
    workdir) whose message names the thing and what was expected."""


class ConfigError(UserError, ValueError):
    """A config field (or the data it points to) that cannot work; the message names the field."""


class MissingFile(UserError, FileNotFoundError):
    """A file the config names (weights, reference statistics, a checkpoint to convert) is not
    there; the message names it and how to make it."""


class StoppedBeforeTraining(BaseException):
    """SIGTERM during set-up, restore or compile, before the first step: nothing new to save.

    A BaseException, like KeyboardInterrupt: raised from the signal handler wherever the set-up
    happens to be, it must pass every `except Exception` there (a checkpoint being verified
    would otherwise be called damaged). In `EXPECTED`: one line and exit status 2."""


# What main.py reports without a traceback: uvit_jax's base, the data layer's, and a stop.
EXPECTED: tuple[type[BaseException], ...] = (UserError, DataError, StoppedBeforeTraining)
