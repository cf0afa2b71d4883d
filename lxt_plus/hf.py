"""Moved to :mod:`lxt_plus.engine.hf`; this import path keeps working, with a ``DeprecationWarning``, for one release."""

from lxt_plus._moved import forward

__getattr__, __dir__ = forward(__name__, "lxt_plus.engine.hf")
