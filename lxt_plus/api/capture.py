"""Latent relevance: per layer, per attention head and per MLP neuron, from the same backward pass.

``explain(..., capture=("layers", "heads", "neurons"))`` records intermediate tensors during the
patched forward and asks for their gradients in the one backward pass that gives input relevance;
relevance of a hooked tensor ``x`` is ``x * x.grad`` (Gradient×Input under the LRP rules), summed
over the feature dimension. Nothing is run twice.

Captured values, all batch-first and on the CPU (``L`` layers, ``H`` heads, ``I`` MLP neurons):

``captures["layers"]``
    ``(batch, L + 1, seq)``: relevance of every token in the residual stream; row 0 is the input of
    the first layer (the embedding output), row ``l`` the output of layer ``l``. Under the
    ``"conservative-check"`` preset every row sums to the target logit.
``captures["heads"]`` / ``captures["heads_per_token"]``
    ``(batch, L, H)`` / ``(batch, L, H, seq)``: relevance flowing through each head's output (the
    input of the attention output projection), in total and per query position. A hybrid's layers
    without softmax attention (state-space or linear-attention layers) are zeros, and so are the
    head slots of a layer with fewer heads than the most.
``captures["head_patterns"]``
    ``{layer: (batch, H, seq_q, seq_k)}``: the attention-head-rule decomposition of each head's
    relevance over (query, key) pairs, ``R_ij = A_ij (v_j · g_i)`` with the attention weights ``A``
    held constant (Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative
    Propagation"); row ``i`` sums to ``heads_per_token[..., i]``. Kept for every layer when the
    sequence has at most :data:`PATTERN_MAX_SEQ` tokens; for longer inputs name the layers with
    :func:`keep_patterns`. Only models whose attention runs through transformers' attention
    registry (most of them) report patterns.
``captures["neurons"]``
    ``(batch, L, I)``: relevance of every neuron at the input of each MLP's down projection,
    summed over tokens; a layer's neurons sum to the relevance written by its MLP.

The transformer blocks are found generically: the longest ``nn.ModuleList`` whose items hold a
module recognised as attention by :func:`lxt_plus.engine.detect.detect_roles` (not one inside
such an item: T5's blocks, not a block's parts). For an encoder-decoder that is the encoder's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lxt_plus.engine.detect import detect_roles, find_block_list
from lxt_plus.engine.functional import acc
from lxt_plus.engine.patching import ATTENTION_OBSERVERS
from lxt_plus.errors import InputError, UnsupportedModelError
from lxt_plus.results.captures import Captures, layer_contributions, top_neurons

if TYPE_CHECKING:
    pass

__all__ = [
    "Recorder",
    "BlockParts",
    "find_blocks",
    "keep_patterns",
    "top_neurons",
    "layer_contributions",
    "PATTERN_MAX_SEQ",
    "CAPTURES",
]

CAPTURES = ("layers", "heads", "neurons")
PATTERN_MAX_SEQ = 256
_OUT_NAMES = ("o_proj", "out_proj", "c_proj", "dense", "wo", "out_lin", "o", "proj", "out")
_PATTERN_LAYERS: contextvars.ContextVar[tuple[int, ...] | str | None] = contextvars.ContextVar(
    "lxt_plus_pattern_layers", default=None
)


@contextlib.contextmanager
def keep_patterns(layers: Sequence[int] | str = "all") -> Iterator[None]:
    """Choose the layers whose head patterns ``capture=("heads",)`` keeps, whatever the length.

    Parameters
    ----------
    layers:
        Layer indices (negative counts from the end), ``"all"``, or ``()`` for none.

    Examples
    --------
    >>> with keep_patterns([-2, -1]):  # doctest: +SKIP
    ...     exp = explain(model, long_text, tokenizer=tok, capture="heads")
    >>> sorted(exp.captures["head_patterns"])  # doctest: +SKIP
    [28, 29]
    """
    if isinstance(layers, str) and layers != "all":
        raise InputError(f"keep_patterns takes layer indices or 'all', got {layers!r}")
    token = _PATTERN_LAYERS.set(layers if isinstance(layers, str) else tuple(int(i) for i in layers))
    try:
        yield
    finally:
        _PATTERN_LAYERS.reset(token)


# ----------------------------------------------------------------------------- structure
@dataclass
class BlockParts:
    """The modules of one transformer block that the capture hooks.

    Attributes
    ----------
    block:
        The block (an item of the layer list).
    attention:
        The module recognised as attention, or ``None``.
    out_proj:
        The linear layer that consumes the concatenated head outputs, or ``None``.
    n_heads:
        Number of query heads (0 when unknown).
    down_proj:
        The MLP's down projection (its input holds one value per neuron), or ``None`` (MoE).
    """

    block: nn.Module
    attention: nn.Module | None
    out_proj: nn.Module | None
    n_heads: int
    down_proj: nn.Module | None


def _features(m: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a Linear or a transformers ``Conv1D``."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    weight = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def _n_heads(attention: nn.Module, model: nn.Module) -> int:
    for name in ("num_heads", "num_attention_heads", "n_head", "n_heads"):
        value = getattr(attention, name, None)
        if isinstance(value, int) and value > 0:
            return value
    for cfg in (getattr(attention, "config", None), getattr(model, "config", None)):
        value = getattr(cfg, "num_attention_heads", None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def find_blocks(model: nn.Module) -> tuple[str, list[BlockParts]]:
    """The model's transformer blocks and the modules the capture hooks in each.

    Returns
    -------
    path, parts
        Path of the layer list and one :class:`BlockParts` per block.

    Raises
    ------
    UnsupportedModelError
        If no ``nn.ModuleList`` of blocks with attention is found.
    """
    infos = detect_roles(model)
    best = find_block_list(model, infos)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of transformer blocks with attention: "
            "capture works on transformer models"
        )
    path, blocks = best
    parts = []
    for i, block in enumerate(blocks):
        block_path = f"{path}.{i}" if path else str(i)
        attention = next(
            (
                info.module
                for info in infos  # inside the block, or the block itself (XLM lists its attentions)
                if info.role == "attention"
                and (info.path == block_path or info.path.startswith(block_path + "."))
            ),
            None,
        )
        parts.append(_block_parts(model, block, attention))
    return path, parts


def _proj_name(path: str) -> str:
    """A linear's name, lower-cased (ModernBERT's ``Wo``); a plain ``linear`` inside a wrapper takes
    the wrapper's (Moshi's ``o_proj.linear``)."""
    parts = path.lower().split(".")
    return parts[-2] if parts[-1] == "linear" and len(parts) > 1 else parts[-1]


def _block_parts(model: nn.Module, block: nn.Module, attention: nn.Module | None) -> BlockParts:
    n_heads = _n_heads(attention, model) if attention is not None else 0
    inside = {id(m) for m in attention.modules()} if attention is not None else set()
    out_proj = None
    if attention is not None and n_heads:
        named = [(_proj_name(p), m) for p, m in attention.named_modules() if _features(m)]
        # the concatenated heads feed a linear with a head-divisible width, named like an output projection
        out_proj = next(
            (
                m
                for name in _OUT_NAMES
                for last, m in reversed(named)
                if last == name and _features(m)[0] % n_heads == 0  # type: ignore[index]
            ),
            None,
        )
        if out_proj is None:  # BERT / ViT: the projection sits in a sibling ``output`` module
            parent = next((m for m in block.modules() if any(c is attention for c in m.children())), None)
            if parent is not None:
                out_proj = next(
                    (
                        m
                        for p, m in parent.named_modules()
                        if id(m) not in inside
                        and _features(m)
                        and "output" in p.split(".")
                        and _features(m)[0] % n_heads == 0  # type: ignore[index]
                    ),
                    None,
                )  # type: ignore[index]
    d_model = _features(out_proj)[1] if out_proj is not None else None  # type: ignore[index]
    down_proj = None
    if d_model is not None:
        for m in block.modules():
            f = _features(m)
            if f and id(m) not in inside and m is not out_proj and f[1] == d_model and f[0] != d_model:
                down_proj = m  # the last one in module order
    return BlockParts(block, attention, out_proj, n_heads, down_proj)


# ----------------------------------------------------------------------------- recorder
@dataclass
class _AttentionCall:
    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    causal: bool
    scaling: float | None
    softcap: float | None
    position_bias: Tensor | None
    sinks: Tensor | None
    weights: Tensor | None


class Recorder:
    """Hooks that keep latent tensors during one patched forward and turn their gradients into relevance.

    Used by :func:`lxt_plus.explain`: enter the recorder around the forward, pass
    :meth:`tensors` to the same ``torch.autograd.grad`` call as the input leaf, give the gradients
    back to :meth:`finish` in the same order, and read :meth:`result`.

    Parameters
    ----------
    model:
        A transformer (HF model or a module with a list of blocks).
    captures:
        Any of ``"layers"``, ``"heads"``, ``"neurons"``.
    """

    def __init__(self, model: nn.Module, captures: Sequence[str]) -> None:
        unknown = [c for c in captures if c not in CAPTURES]
        if unknown:
            raise InputError(f"unknown capture {unknown[0]!r}; valid: {', '.join(CAPTURES)}")
        self.model = model
        self.captures = tuple(dict.fromkeys(captures))
        self.path, self.parts = find_blocks(model)
        name = type(model).__name__
        if "layers" in self.captures and any(p.block is p.attention for p in self.parts):
            raise InputError(
                f"capture 'layers': {name} keeps its attention modules in a list of their own, beside "
                "its MLPs and norms, so no module's output is the residual stream after a layer; "
                "capture 'heads' still works"
            )
        # layers with softmax attention heads; a hybrid's other layers (state-space, linear
        # attention) have none, and report zeros
        self._head_layers = [i for i, p in enumerate(self.parts) if p.out_proj is not None]
        if "heads" in self.captures and not self._head_layers:
            raise InputError(
                f"capture 'heads': no attention output projection (a linear layer reading the "
                f"concatenated heads) found in any layer of {name}; capture 'layers' still works"
            )
        if "neurons" in self.captures:
            missing = [i for i, p in enumerate(self.parts) if p.down_proj is None]
            if missing:
                raise UnsupportedModelError(
                    f"capture 'neurons': layer {missing[0]} of {name} has no dense MLP down "
                    "projection (mixture-of-experts layers are not supported)"
                )
        self._layer_of = {id(p.attention): i for i, p in enumerate(self.parts) if p.attention is not None}
        self._reset()

    def _reset(self) -> None:
        n = len(self.parts)
        self._hooks: list[Any] = []
        self._token: contextvars.Token[Any] | None = None
        self._first_input: Tensor | None = None
        self._outputs: list[Tensor | None] = [None] * n
        self._heads: list[Tensor | None] = [None] * n
        self._neurons: list[Tensor | None] = [None] * n
        self._calls: dict[int, _AttentionCall] = {}
        self._result: dict[str, Any] = {}

    # ---------------------------------------------------------------- forward
    def __enter__(self) -> Recorder:
        self._reset()
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()  # hooks must not fire again (checkpointed layers recompute in the backward)

    def _remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._token is not None:
            ATTENTION_OBSERVERS.reset(self._token)
            self._token = None

    def _register(self) -> None:
        def keep(store: list[Tensor | None], i: int, value: Any) -> None:
            if store[i] is None and isinstance(value, Tensor) and value.requires_grad:
                store[i] = value

        if "layers" in self.captures:

            def first(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if self._first_input is None:
                    x = args[0] if args else kwargs.get("hidden_states")
                    self._first_input = x if isinstance(x, Tensor) and x.requires_grad else None

            self._hooks.append(self.parts[0].block.register_forward_pre_hook(first, with_kwargs=True))
            for i, p in enumerate(self.parts):

                def out_hook(module: nn.Module, args: Any, out: Any, i: int = i) -> None:
                    keep(self._outputs, i, out[0] if isinstance(out, (tuple, list)) else out)

                self._hooks.append(p.block.register_forward_hook(out_hook))
        for name, store, attr in (
            ("heads", self._heads, "out_proj"),
            ("neurons", self._neurons, "down_proj"),
        ):
            if name not in self.captures:
                continue
            for i, p in enumerate(self.parts):
                if name == "heads" and i not in self._head_layers:
                    continue

                def pre(
                    module: nn.Module, args: tuple[Any, ...], i: int = i, store: list[Tensor | None] = store
                ) -> None:
                    keep(store, i, args[0] if args else None)

                self._hooks.append(getattr(p, attr).register_forward_pre_hook(pre))
        if "heads" in self.captures:
            self._token = ATTENTION_OBSERVERS.set(ATTENTION_OBSERVERS.get() + (self._observe,))

    def _observe(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        out: Any,
        kwargs: dict[str, Any],
    ) -> None:
        i = self._layer_of.get(id(module))
        if i is None or i in self._calls or not self._wants_pattern(i, query.shape[2]):
            return
        weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        expected = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        causal = kwargs.get("is_causal")
        self._calls[i] = _AttentionCall(
            query.detach(),
            key.detach(),
            value.detach(),
            mask,
            bool(getattr(module, "is_causal", False) if causal is None else causal),
            kwargs.get("scaling"),
            kwargs.get("softcap"),
            kwargs.get("position_bias"),
            kwargs.get("s_aux"),
            weights.detach() if isinstance(weights, Tensor) and tuple(weights.shape) == expected else None,
        )

    def _wants_pattern(self, layer: int, seq: int) -> bool:
        chosen = _PATTERN_LAYERS.get()
        if chosen is None:
            return seq <= PATTERN_MAX_SEQ
        if chosen == "all":
            return True
        n = len(self.parts)
        return layer in {c % n for c in chosen if isinstance(c, int) and -n <= c < n}

    # ---------------------------------------------------------------- backward
    def tensors(self) -> list[Tensor]:
        """The recorded tensors whose gradients :meth:`finish` needs, in a fixed order."""
        out: list[Tensor | None] = []
        if "layers" in self.captures:
            out += [self._first_input, *self._outputs]
        if "heads" in self.captures:
            out += [self._heads[i] for i in self._head_layers]
        if "neurons" in self.captures:
            out += self._neurons
        if any(t is None for t in out):
            raise InputError(
                f"capture {self.captures}: some blocks of {type(self.model).__name__} did not run "
                "or gave no differentiable tensor during the forward pass"
            )
        return out  # type: ignore[return-value]

    def finish(self, grads: Sequence[Tensor | None], rows: int | None = None) -> None:
        """Turn the gradients of :meth:`tensors` (same order) into relevance. ``rows``: the batch
        size, to put a model's sequence-first hidden states (XLNet's ``(seq, batch, d)``) batch-first."""

        def relevance(x: Tensor, g: Tensor | None) -> Tensor:
            r = _product(x, g)
            if rows is not None and r.dim() >= 3 and r.shape[0] != rows and r.shape[1] == rows:
                r = r.transpose(0, 1)
            return r

        tensors = self.tensors()
        if len(grads) != len(tensors):
            raise InputError(f"the recorder expected {len(tensors)} gradients, got {len(grads)}")
        pairs = list(zip(tensors, grads, strict=True))
        n = len(self.parts)
        result: dict[str, Any] = {}
        with torch.no_grad():
            if "layers" in self.captures:
                layers, pairs = pairs[: n + 1], pairs[n + 1 :]
                per_layer = [relevance(x, g).sum(-1) for x, g in layers]
                shapes = list(dict.fromkeys(tuple(r.shape[1:]) for r in per_layer))  # in layer order
                if len(shapes) > 1:
                    raise InputError(
                        f"capture 'layers': the blocks of {type(self.model).__name__} change the "
                        f"number of tokens from stage to stage ({' -> '.join(map(str, shapes))}), "
                        "so their relevance has no common token axis; capture 'heads' or explain "
                        "the pixels"
                    )
                result["layers"] = torch.stack(per_layer, 1).cpu()
            if "heads" in self.captures:
                k = len(self._head_layers)
                heads, pairs = pairs[:k], pairs[k:]
                found: dict[int, Tensor] = {}
                patterns = {}
                for i, (x, g) in zip(self._head_layers, heads, strict=True):
                    h = self.parts[i].n_heads
                    r = relevance(x, g)
                    found[i] = r.reshape(*r.shape[:-1], h, -1).sum(-1).transpose(-1, -2)
                    if i in self._calls:
                        grad = torch.zeros_like(x) if g is None else g
                        patterns[i] = _pattern(self._calls[i], grad.reshape(*grad.shape[:-1], h, -1)).cpu()
                # (batch, heads, seq) per layer; layers without heads, and the head slots of layers
                # with fewer heads than the most, are zeros
                first = next(iter(found.values()))
                most = max(t.shape[1] for t in found.values())
                blank = first.new_zeros(first.shape[0], most, first.shape[2])
                per_token = [
                    torch.nn.functional.pad(found[i], (0, 0, 0, most - found[i].shape[1]))
                    if i in found
                    else blank
                    for i in range(n)
                ]
                tokens = torch.stack(per_token, 1)
                result["heads"] = tokens.sum(-1).cpu()
                result["heads_per_token"] = tokens.cpu()
                result["head_patterns"] = patterns
            if "neurons" in self.captures:
                result["neurons"] = torch.stack([relevance(x, g).sum(1) for x, g in pairs], 1).cpu()
        self._result = result
        self._calls = {}

    def result(self) -> Captures:
        """The captured relevance (see the module docstring for keys and shapes)."""
        return Captures.from_mapping(self._result)


def _product(x: Tensor, g: Tensor | None) -> Tensor:
    """``x * g`` in the accumulation dtype, ``(batch, seq, features)``; zeros where no gradient arrived."""
    x = acc(x.detach())
    return torch.zeros_like(x) if g is None else x * acc(g)


def _attention_weights(call: _AttentionCall) -> Tensor:
    """``A`` ``(batch, heads, q, k)`` as the attention function computed it (GQA keys repeated)."""
    q, k = acc(call.query), acc(call.key)
    if call.weights is not None:
        return acc(call.weights)
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scaling = call.scaling if call.scaling is not None else q.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * scaling
    if call.softcap:
        s = torch.tanh(s / call.softcap) * call.softcap
    if call.position_bias is not None:
        s = s + acc(call.position_bias)
    n_q, n_k = s.shape[-2:]
    if call.mask is not None:
        mask = call.mask[..., :n_k]
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + acc(mask)
    elif call.causal and n_q > 1:
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(n_k - n_q + 1)
        s = s.masked_fill(future, float("-inf"))
    if call.sinks is not None:
        sinks = acc(call.sinks).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        a = torch.softmax(torch.cat([s, sinks], -1), -1)[..., :-1]
    else:
        a = torch.softmax(s, -1)
    return torch.nan_to_num(a, nan=0.0)  # fully masked rows


def _pattern(call: _AttentionCall, grad: Tensor) -> Tensor:
    """``R_ij = A_ij (v_j · g_i)`` per head: ``(batch, heads, q, k)``; ``grad`` is ``(batch, q, heads, d)``."""
    a = _attention_weights(call)
    v = acc(call.value)
    if v.shape[1] != a.shape[1]:
        v = v.repeat_interleave(a.shape[1] // v.shape[1], dim=1)
    g = acc(grad).transpose(1, 2)
    return a * (g @ v.transpose(-1, -2))
