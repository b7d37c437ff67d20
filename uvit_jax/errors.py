"""The errors a user can fix: `main.py` prints their message alone and exits 2 (`EXPECTED`).

Everything else is a bug and keeps its traceback.
"""

from input_pipeline.errors import DataError


class UserError(Exception):
    """An expected failure (a config field, a checkpoint, a dataset, a weights file, a locked
    workdir) whose message names the thing and what was expected."""


class ConfigError(UserError, ValueError):
    """A config field (or the data it points to) that cannot work; the message names the field."""


# What main.py reports without a traceback: uvit_jax's base and the data layer's.
EXPECTED: tuple[type[Exception], ...] = (UserError, DataError)
