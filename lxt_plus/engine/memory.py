"""Will the backward pass fit? The estimate from the probe, and the memory the device has free.

The patch-time probe measures what autograd keeps per token (:class:`~lxt_plus.engine.opcheck.SavedMemory`).
Before a long input runs, :func:`check_fits` compares that, scaled to the input, with the memory
free on the device, and refuses up front when it cannot fit: a forward pass of minutes that dies in
the backward pass, or the system's out-of-memory killer, is the alternative.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from lxt_plus.engine.opcheck import SavedMemory
from lxt_plus.errors import OutOfMemoryError

__all__ = ["available_bytes", "checkpointed_bytes", "check_fits"]


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's free memory, or the host's available
    memory (``MemAvailable``); ``None`` where it cannot be read."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        match = re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def checkpointed_bytes(
    memory: SavedMemory, config: Any, rows: int, tokens: int, dtype_bytes: int
) -> int | None:
    """About what the backward pass keeps with gradient checkpointing: each layer's input and its
    attention output (kept for the recomputation, see ``attention.replay_contexts``), and one
    layer's activations at a time. ``None`` without ``num_hidden_layers`` and ``hidden_size``."""
    layers, hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    if not isinstance(layers, int) or not isinstance(hidden, int) or layers < 1:
        return None
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    width = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else hidden
    kept = rows * tokens * (hidden + width) * dtype_bytes * layers
    return memory.estimate(rows, tokens) // layers + kept


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def check_fits(
    memory: SavedMemory | None,
    config: Any,
    rows: int,
    tokens: int,
    dtype_bytes: int,
    device: torch.device,
    checkpointing: bool,
) -> None:
    """Raise :class:`~lxt_plus.errors.OutOfMemoryError` before the forward pass when what the
    backward pass keeps for ``rows × tokens`` (estimated from the probe) exceeds the memory free on
    ``device``; the message gives the estimate and the option that would make it fit."""
    if memory is None:
        return
    free = available_bytes(device)
    if free is None:
        return
    plain = memory.estimate(rows, tokens)
    ckpt = checkpointed_bytes(memory, config, rows, tokens, dtype_bytes)
    need = ckpt if checkpointing and ckpt is not None else plain
    if need <= free:
        return
    what = f"explaining {rows} × {tokens} tokens keeps at least {_gb(need)} for the backward pass"
    where = f"{_gb(free)} is free on {device.type}"
    if not checkpointing and ckpt is not None and ckpt <= free:
        fix = f"pass checkpointing=True (about {_gb(ckpt)}: layer activations are recomputed)"
    else:
        per_token = need / max(tokens, 1)
        fit = int(free // per_token) if per_token else tokens
        fix = f"explain at most about {fit} tokens per row" + (" or fewer rows" if rows > 1 else "")
        if device.type == "cpu":
            fix += ", or free memory on this machine"
    raise OutOfMemoryError(f"{what}, but only {where}; {fix}")
