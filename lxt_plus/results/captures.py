"""What ``explain(..., capture=...)`` recorded, typed: per layer, per head and per MLP neuron.

:class:`Captures` is a dataclass with one field per capture (``None`` when not captured) that also
reads as a mapping, so ``exp.captures["layers"]``, ``"heads" in exp.captures`` and
``dict(exp.captures)`` work as they did when captures were a plain dict. Shapes and meaning are
described in :mod:`lxt_plus.api.capture`, which records them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lxt_plus.errors import InputError

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation

__all__ = ["Captures", "top_neurons", "layer_contributions"]


@dataclass(eq=False)
class Captures(MutableMapping[str, Any]):
    """The relevance captured in one explain call, batch-first and on the CPU.

    Attributes
    ----------
    layers:
        ``(batch, L + 1, seq)``: relevance of every token in the residual stream, row 0 the
        embedding output, row ``l`` the output of layer ``l``.
    heads:
        ``(batch, L, H)``: relevance through each attention head's output.
    heads_per_token:
        ``(batch, L, H, seq)``: the same per query position.
    head_patterns:
        ``{layer: (batch, H, seq_q, seq_k)}``: each head's relevance over (query, key) pairs.
    neurons:
        ``(batch, L, I)``: relevance of every MLP neuron, summed over tokens.
    other:
        Anything else stored under another key (kept, serialised, sliced with the batch).
    """

    layers: Tensor | None = None
    heads: Tensor | None = None
    heads_per_token: Tensor | None = None
    head_patterns: dict[int, Tensor] | None = None
    neurons: Tensor | None = None
    other: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> Captures:
        """Captures from a dict of key -> value (the keys above, or any other)."""
        if isinstance(data, Captures):
            return data
        if data is not None and not isinstance(data, Mapping):
            raise InputError(f"captures must be a mapping of name -> value, got {type(data).__name__}")
        out = cls()
        for key, value in (data or {}).items():
            out[str(key)] = value
        return out

    # ----------------------------------------------------------------------- mapping protocol
    def __getitem__(self, key: str) -> Any:
        if key in _FIELDS:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.other[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _FIELDS:
            if key == "head_patterns" and value is not None:  # JSON turns the layer numbers into strings
                value = {int(k): v for k, v in value.items()}
            setattr(self, key, value)
        else:
            self.other[key] = value

    def __delitem__(self, key: str) -> None:
        if key in _FIELDS and getattr(self, key) is not None:
            setattr(self, key, None)
        else:
            del self.other[key]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in _FIELDS if getattr(self, k) is not None)
        yield from self.other

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        def shape(v: Any) -> str:
            if isinstance(v, Tensor):
                return f"tensor{tuple(v.shape)}"
            if isinstance(v, dict):
                return f"{{{len(v)} layers}}" if all(isinstance(k, int) for k in v) else f"dict({len(v)})"
            return type(v).__name__

        return "Captures(" + ", ".join(f"{k}={shape(v)}" for k, v in self.items()) + ")"


_FIELDS = tuple(f.name for f in fields(Captures) if f.name != "other")


def captured(exp: Explanation, key: str) -> Tensor:
    """The capture ``key`` of ``exp``; an :class:`~lxt_plus.errors.InputError` saying how to get it if absent."""
    if key not in exp.captures:
        raise InputError(f"this explanation has no {key!r} capture; explain with capture=({key!r},)")
    value: Tensor = exp.captures[key]
    return value


def top_neurons(
    exp: Explanation, k: int = 10, row: int = 0, by: str = "positive"
) -> list[tuple[int, int, float]]:
    """The ``k`` most relevant MLP neurons.

    Parameters
    ----------
    exp:
        An explanation made with ``capture=("neurons",)``.
    k:
        How many to return.
    row:
        Row of a batch.
    by:
        ``"positive"`` (largest relevance first), ``"negative"`` (most negative first) or ``"abs"``.

    Returns
    -------
    list of (layer, neuron, relevance)
    """
    rel = captured(exp, "neurons")[row]
    if by not in ("positive", "negative", "abs"):
        raise InputError(f"by must be 'positive', 'negative' or 'abs', got {by!r}")
    key = {"positive": rel, "negative": -rel, "abs": rel.abs()}[by].flatten()
    order = torch.argsort(key, descending=True)[:k].tolist()
    width = rel.shape[-1]
    return [(i // width, i % width, float(rel.flatten()[i])) for i in order]


def layer_contributions(exp: Explanation, row: int = 0) -> dict[str, Tensor]:
    """Relevance passing through each layer's attention branch and MLP branch, ``(L,)`` each.

    Needs ``capture=("heads", "neurons")``. The attention value is the relevance at the input of
    the attention output projection (all heads), the MLP value the relevance at the input of the
    down projection (all neurons); comparing two targets shows which layers' branches carry more
    of one than of the other.
    """
    return {"attention": captured(exp, "heads")[row].sum(-1), "mlp": captured(exp, "neurons")[row].sum(-1)}
