"""The switch between fastvis' kernels and the pure-PyTorch references."""
from __future__ import annotations

import warnings

_state = {"reference": False}
_warned = set()


def reference_enabled() -> bool:
    return _state["reference"]


class use_reference:
    """Makes every fastvis op run its pure-PyTorch reference (for debugging and comparison).

    Works as a call (``fastvis.use_reference(True)``; ``fastvis.use_reference(False)`` to
    switch back) and as a context manager that restores the previous setting on exit::

        with fastvis.use_reference():
            y_ref = model(x)
    """

    def __init__(self, flag: bool = True):
        self._prev = _state["reference"]
        _state["reference"] = bool(flag)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state["reference"] = self._prev
        return False


def warn_fallback_once(key: str, message: str) -> None:
    """The explicit, warned-once fallback to a reference on devices the core does not serve."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
