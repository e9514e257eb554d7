"""Error measures and casts shared by the op tests."""

import jax.numpy as jnp
import numpy as np


def rel(a, b) -> float:
    """Relative error max|a − b| / max|b|, in float64 numpy (b is the reference); max|a| when b is all zero."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


def cast(dtype, *xs):
    """jnp arrays of `dtype` (None stays None)."""
    return [None if x is None else jnp.asarray(x, dtype) for x in xs]
