"""Offloaded weights are not kept by the backward pass.

accelerate's offload hooks load a module's weights just before it runs and drop them right after,
so that a model larger than memory runs one piece at a time. Autograd, though, keeps every weight a
linear layer multiplied the input with (the input gradient needs it), which would pull the whole
model into memory over a forward pass with gradients. Inside :func:`offloaded_saves`, a weight that
an offload hook loaded is saved for the backward pass as a reference to the hook's weight store,
and read from there again (one layer at a time) when the backward pass needs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["offload_hooks", "offloaded_saves", "offloaded_weights"]


def offload_hooks(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` that load its weights from an offload store."""
    hook = getattr(module, "_hf_hook", None)
    hooks = list(getattr(hook, "hooks", [hook])) if hook is not None else []
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def _module_tensors(module: nn.Module, hook: Any) -> Iterator[tuple[str, Tensor]]:
    """The tensors ``hook`` loads into ``module`` (accelerate's ``named_module_tensors``)."""
    from accelerate.utils import named_module_tensors

    yield from named_module_tensors(
        module,
        include_buffers=getattr(hook, "offload_buffers", False),
        recurse=getattr(hook, "place_submodules", False),
        remove_non_persistent=True,
    )


@dataclass(frozen=True)
class _Reload:
    """A saved weight, by where to read it again and which view of it was saved."""

    hook: Any
    name: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device

    def load(self) -> Tensor:
        value = self.hook.weights_map[self.name]
        return value.to(self.device, self.dtype).as_strided(self.size, self.stride, self.offset)


@contextlib.contextmanager
def _watch_loads(model: nn.Module, loaded: dict[int, tuple[Any, str]], keep: bool) -> Iterator[bool]:
    """While a hooked module runs, ``loaded`` maps the storage of each tensor its offload hook
    loaded to ``(hook, name)`` (with ``keep``, the entries stay after it ran); yields whether
    ``model`` has offload hooks at all."""
    hooked = [(m, h) for m in model.modules() for h in offload_hooks(m)]
    restore = []
    for module, hook in hooked:
        inner = module.__dict__.get("_old_forward")
        if inner is None:
            continue

        def forward(
            *args: Any, _m: nn.Module = module, _h: Any = hook, _inner: Any = inner, **kwargs: Any
        ) -> Any:
            mine = [
                (t.untyped_storage().data_ptr(), (_h, name))
                for name, t in _module_tensors(_m, _h)
                if t.device.type != "meta"
            ]
            loaded.update(mine)
            try:
                return _inner(*args, **kwargs)
            finally:
                if not keep:
                    for ptr, _ in mine:
                        loaded.pop(ptr, None)

        module._old_forward = forward  # type: ignore[assignment]
        restore.append((module, inner))
    try:
        yield bool(hooked)
    finally:
        for module, inner in restore:
            module._old_forward = inner  # type: ignore[assignment]


@contextlib.contextmanager
def offloaded_weights(model: nn.Module) -> Iterator[dict[int, Any]]:
    """The storage addresses (the keys) of every weight an offload hook loads inside the block,
    filled as the modules run: what a forward pass with gradients keeps of them is weights, not
    activations."""
    loaded: dict[int, Any] = {}
    with _watch_loads(model, loaded, keep=True):
        yield loaded


@contextlib.contextmanager
def offloaded_saves(model: nn.Module) -> Iterator[None]:
    """Run a forward pass with gradients on an offloaded ``model`` without keeping its weights.

    No-op for a model without offload hooks. The reloaded weights are the hook's stored values,
    which are what the forward pass multiplied with.
    """
    loaded: dict[int, tuple[Any, str]] = {}  # storage address -> (hook, tensor name), while it runs

    def pack(t: Tensor) -> Any:
        if not loaded or t.layout != torch.strided or not (type(t) is Tensor or isinstance(t, nn.Parameter)):
            return t
        entry = loaded.get(t.untyped_storage().data_ptr())
        if entry is None:
            return t
        hook, name = entry
        return _Reload(
            hook, name, tuple(t.size()), tuple(t.stride()), int(t.storage_offset()), t.dtype, t.device
        )

    def unpack(x: Any) -> Tensor:
        return x.load() if isinstance(x, _Reload) else x

    with _watch_loads(model, loaded, keep=False) as hooked:
        if not hooked:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
