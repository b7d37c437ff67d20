"""The one filter that keeps libraries' chatter out of our logs.

Orbax logs every save and restore at INFO, grain every iterator checkpoint, JAX its compile
cache; orbax also warns on every read-only CheckpointManager it creates. Jobs drop those
libraries' records below WARNING (`main.py`); reading a checkpoint drops orbax's warnings too
(`checkpoints.open_manager(read_only=True)`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

NOISY_LIBRARIES = ("/orbax/", "/grain/", "/jax/_src/")


class QuietLibraries(logging.Filter):
    """Drops the records below `level` (a `logging` level, not absl's) logged from files of
    `libraries` (path fragments)."""

    def __init__(
        self, level: int = logging.WARNING, libraries: Sequence[str] = NOISY_LIBRARIES
    ) -> None:
        super().__init__()
        self.level, self.libraries = level, tuple(libraries)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or not any(
            name in record.pathname for name in self.libraries
        )


@contextlib.contextmanager
def quiet(level: int, libraries: Sequence[str] = NOISY_LIBRARIES) -> Iterator[None]:
    """Within the block, absl's logger (where orbax, grain and JAX log) drops those records."""
    logger, drop = logging.getLogger("absl"), QuietLibraries(level, libraries)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)
