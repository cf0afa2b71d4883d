"""What lxt_plus needs from transformers' own machinery, kept in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["quiet_transformers"]


@contextlib.contextmanager
def quiet_transformers(progress_bars: bool = True) -> Iterator[None]:
    """transformers' and huggingface_hub's log messages at error level (and, with
    ``progress_bars=False``, their loading bars off) inside the block; restored on exit."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_level, level = hub_logging.get_verbosity(), hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_logging.set_verbosity_error()
    hf_logging.set_verbosity_error()
    if not progress_bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hub_logging.set_verbosity(hub_level)
        if bars and not progress_bars:
            hf_logging.enable_progress_bar()
