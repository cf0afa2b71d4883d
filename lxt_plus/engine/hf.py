"""What lxt_plus needs from transformers' own machinery, kept in one place.

lxt_plus registers two attention keys (``lxt_plus_eager``, ``lxt_plus_sdpa``) in transformers'
attention and mask registries while a patch uses them, points the patched model's configs at
them, and reads the attention function each key stands in for. Nothing else in the engine
imports transformers (role detection in :mod:`lxt_plus.engine.detect` reads its classes).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from lxt_plus.engine.detect import is_hf_model

__all__ = [
    "ATTENTION_KEYS",
    "activation_classes",
    "original_attention",
    "quiet_transformers",
    "register_keys",
    "switch_configs",
]

ATTENTION_KEYS = {"eager": "lxt_plus_eager", "sdpa": "lxt_plus_sdpa"}
_ORIGINAL_OF_KEY = {v: k for k, v in ATTENTION_KEYS.items()}
_CONFIG_USERS: dict[int, list[Any]] = {}  # id(config) -> [config, original value, users]
_EAGER_CACHE: dict[type, Callable[..., Any]] = {}


class _KeyUse:
    """How many patches use our registry keys, and what stood under those names before them."""

    users = 0
    previous: dict[tuple[int, str], Any] = {}  # (registry index, key) -> entry


def original_attention(module: nn.Module, original: str) -> Callable[..., Any]:
    """transformers' attention function that the key of ``original`` (``"eager"``/``"sdpa"``) stands in for."""
    if original != "eager":
        return ALL_ATTENTION_FUNCTIONS[original]
    cls = type(module)
    fn = _EAGER_CACHE.get(cls)
    if fn is None:
        # the family's own eager function (handles softcap, sinks, ...), else a generic one
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is None:
            fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
        _EAGER_CACHE[cls] = fn
    return fn


def register_keys(
    make_attention: Callable[[str], Callable[..., Any]], undo: list[Callable[[], None]]
) -> None:
    """Add our two keys to transformers' attention and mask registries while a patch uses them.

    The first user registers them, the last one's ``remove()`` takes them out again (restoring
    whatever stood under those names before), so nothing is left in transformers afterwards.
    ``make_attention(original)`` builds the function registered under the key of ``original``.
    """
    registries = (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
    if _KeyUse.users == 0:
        _KeyUse.previous = {
            (i, key): reg[key]
            for i, reg in enumerate(registries)
            for key in ATTENTION_KEYS.values()
            if key in reg
        }
        for original, key in ATTENTION_KEYS.items():
            AttentionInterface.register(key, make_attention(original))
            AttentionMaskInterface.register(key, cast(Any, registries[1][original]))
    _KeyUse.users += 1

    def release() -> None:
        _KeyUse.users -= 1
        if _KeyUse.users == 0:
            for i, reg in enumerate(registries):
                for key in ATTENTION_KEYS.values():
                    if (i, key) in _KeyUse.previous:
                        reg[key] = _KeyUse.previous[(i, key)]
                    else:
                        reg.pop(key, None)
            _KeyUse.previous = {}

    undo.append(release)


def switch_configs(modules: Iterable[nn.Module], undo: list[Callable[[], None]]) -> None:
    """Point every config of the model's ``modules`` that dispatches through the registry at our key."""
    seen: set[int] = set()
    for sub in modules:
        if not is_hf_model(sub) or id(sub.config) in seen:
            continue
        config = cast(Any, sub).config
        seen.add(id(config))
        if not cast(Any, type(sub))._can_set_attn_implementation():
            continue
        current = config._attn_implementation
        if current in _ORIGINAL_OF_KEY:  # shared config already switched by another patched model
            state = _CONFIG_USERS[id(config)]
            state[2] += 1
        else:
            key = ATTENTION_KEYS.get(current or "eager", ATTENTION_KEYS["sdpa"])
            state = [config, config._attn_implementation_internal, 1]
            _CONFIG_USERS[id(config)] = state
            config._attn_implementation_internal = key

        def restore(state: list[Any] = state) -> None:
            state[2] -= 1
            if state[2] == 0:
                state[0]._attn_implementation_internal = state[1]
                _CONFIG_USERS.pop(id(state[0]), None)

        undo.append(restore)


def activation_classes() -> dict[str, type]:
    """transformers' own activation classes that lxt_plus knows in closed form, by name."""
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover - a transformers release without the class
        return {}
    return {"silu": SiLUActivation}


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
