"""Numerical comparison helpers shared by the tests."""

import numpy as np


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64 (the golden files' criterion)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
