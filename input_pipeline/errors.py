"""The data layer's expected errors (it imports nothing of uvit_jax, so they have their own
base); `uvit_jax.errors.EXPECTED` lists them beside uvit_jax's for `main.py`'s clean exit."""


class DataError(Exception):
    """An expected failure of the data layer: a dataset, a shard or a data field of the config."""


class DataConfigError(DataError, ValueError):
    """A config field the data layer cannot work with; the message names the field."""


class MissingDataFile(DataError, FileNotFoundError):
    """A dataset file or folder the config names is not there; the message names it."""
