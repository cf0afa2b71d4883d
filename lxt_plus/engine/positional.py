"""Positional relevance (PA-LRP, Bakish et al. 2025): the position encoding as an input.

LRP for transformers usually treats the position encoding as a constant: a learned or sinusoidal
table added to the token embeddings keeps its share of the relevance like a bias, and rotary
angles (``cos``, ``sin``) are coefficients of a linear map of ``q`` and ``k``. PA-LRP reads the
input as position-token pairs and gives the position its own relevance:

- an **added table** (learned, sinusoidal) splits relevance with the token embedding by the
  ε-rule on the sum. That is Gradient×Input at the table's output, which explaining already reads
  (see :func:`lxt_plus.engine.detect.is_position_embedding`);
- **rotary** angles are inputs: ``q·cos + rotate_half(q)·sin`` is a sum of products of two
  input-dependent factors, so each product gets the uniform rule (half to ``q``, half to
  ``cos`` or ``sin``) and the sum the ε-rule.

For rotary models the positional attention rules (``pa-attnlrp``, ``pa-ah-lrp``) replace the
``position_embeddings`` tensors that an attention module receives by fresh leaves (one set per
layer, so relevance per layer is available), and run the module's own forward under
:class:`PositionalMode`, which applies the uniform rule to products with those leaves.
:func:`positional_leaves` collects the leaves of one forward pass; explaining asks for their
gradients in the same backward pass as the input relevance.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lxt_plus.engine.functional import acc
from lxt_plus.engine.modes import PositionalMode

__all__ = [
    "positional_leaves",
    "positional_forward",
    "positional_relevance",
    "POSITIONAL_KWARG",
    "position_buffer_leaves",
]

POSITIONAL_KWARG = "position_embeddings"
_MARK = "_lxt_plus_positional"
# the leaves of the forward pass being explained, one list of tensors per attention call
_LEAVES: contextvars.ContextVar[list[list[Tensor]] | None] = contextvars.ContextVar(
    "lxt_plus_positional_leaves", default=None
)


@contextlib.contextmanager
def positional_leaves() -> Iterator[list[list[Tensor]]]:
    """Collect the positional leaves that attention modules make during the enclosed forward
    pass: one list (``cos``, ``sin``, ...) per attention call, in call order."""
    calls: list[list[Tensor]] = []
    token = _LEAVES.set(calls)
    try:
        yield calls
    finally:
        _LEAVES.reset(token)


def _leaf(t: Tensor, rows: int) -> Tensor:
    value = t.detach()
    if rows > 1 and value.dim() >= 3 and value.shape[0] == 1:  # shared over the batch: one per row
        value = value.expand(rows, *value.shape[1:])
    return value.clone().requires_grad_(True)


def _positional_argument(module: nn.Module) -> int | None:
    """The index of ``position_embeddings`` among the positional parameters of the module class's
    ``forward`` (after ``self``), if it has one."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index(POSITIONAL_KWARG) if POSITIONAL_KWARG in names else None


def _rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
    return hidden.shape[0] if isinstance(hidden, Tensor) and hidden.dim() >= 2 else 1


def _substitute(value: Any, rows: int, made: list[Tensor]) -> Any:
    """``value`` (a tensor or a tuple of tensors) with every real floating tensor replaced by a
    view of a fresh leaf (appended to ``made``); anything else unchanged."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() or getattr(value, _MARK, False):
            return value
        leaf = _leaf(value, rows)
        made.append(leaf)
        view = leaf.view_as(leaf)
        setattr(view, _MARK, True)
        return view
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_substitute(v, rows, made) for v in value)
    if isinstance(value, list):
        return [_substitute(v, rows, made) for v in value]
    return value


def positional_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` of an attention module with its ``position_embeddings`` made leaves and
    products with them ruled by :class:`PositionalMode`."""
    index = _positional_argument(module)

    def fwd(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        made: list[Tensor] = []
        rows = _rows(args, kwargs)
        if POSITIONAL_KWARG in kwargs:
            kwargs[POSITIONAL_KWARG] = _substitute(kwargs[POSITIONAL_KWARG], rows, made)
        elif index is not None and len(args) > index:
            args = (*args[:index], _substitute(args[index], rows, made), *args[index + 1 :])
        if made:
            calls = _LEAVES.get()
            if calls is not None:
                calls.append(made)
        with PositionalMode(made):
            return forward(*args, **kwargs)

    return fwd


def positional_relevance(
    calls: Sequence[Sequence[Tensor]], grads: Sequence[Tensor | None], rows: int, seq: int
) -> Tensor | None:
    """Relevance of the positional leaves per attention call, ``(rows, calls, seq)``; ``grads``
    follow the leaves of ``calls`` in order. ``None`` when there are none."""
    if not calls:
        return None
    out = torch.zeros(rows, len(calls), seq, dtype=torch.float64)
    it = iter(grads)
    for c, leaves in enumerate(calls):
        for leaf in leaves:
            g = next(it)
            if g is None:
                continue
            r = (acc(leaf.detach()) * acc(g)).sum(-1)
            while r.dim() > 2:  # leading axes beside the batch (multimodal rotary sections)
                r = r.sum(0)
            if r.dim() == 1:
                r = r[None]
            if r.shape[-1] != seq or r.shape[0] not in (rows, 1):
                continue
            out[:, c] += r.detach().double().cpu()
    return out


_READS = frozenset((Tensor.__getitem__, torch.index_select, Tensor.index_select, torch.embedding))
_MOVES = frozenset((Tensor.to, Tensor.type_as, Tensor.float, Tensor.contiguous))


class _BufferReads(TorchFunctionMode):
    """Rows read from position buffers (``table[position_ids]``) become leaves: ``make(out)``
    turns each read into the tensor the model goes on with. A copy of a tracked buffer
    (``table.to(dtype)``) is tracked too."""

    def __init__(self, tables: list[Tensor], make: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.tables = {id(t): t for t in tables}  # the values keep the ids valid
        self.make = make

    def _tracked(self, t: Any) -> bool:
        return isinstance(t, Tensor) and self.tables.get(id(t)) is t

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not args or not isinstance(out, Tensor):
            return out
        table = args[1] if func is torch.embedding else args[0]  # embedding(weight, ids)
        if func in _MOVES and self._tracked(table):
            self.tables[id(out)] = out
        elif func in _READS and self._tracked(table) and out.is_floating_point():
            return self.make(out)
        return out


# a view or reshape of a whole position table (SigLIP2's and GLM-4V's, resized in ``forward``)
_WHOLE = frozenset(
    (
        Tensor.reshape,
        Tensor.view,
        Tensor.unsqueeze,
        Tensor.permute,
        Tensor.transpose,
        Tensor.flatten,
        Tensor.t,
    )
)


class _WholeReads(TorchFunctionMode):
    """A position embedding's weight read whole (``weight.reshape(side, side, -1)``, then resized
    to the image's grid) becomes a leaf: ``make(out)`` is what the model goes on with."""

    def __init__(self, weights: list[Tensor], make: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.weights = {id(w): w for w in weights}
        self.make = make

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if (
            func in _WHOLE
            and args
            and isinstance(out, Tensor)
            and isinstance(args[0], Tensor)
            and self.weights.get(id(args[0])) is args[0]
        ):
            return self.make(out)
        return out


@contextlib.contextmanager
def _whole_reads(owners: dict[nn.Module, list[Tensor]], make: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """:class:`_WholeReads` active while each owner of a position embedding runs (its own
    ``forward`` only, so the rest of the model keeps torch's fast path)."""
    active: list[_WholeReads] = []

    def enter(weights: list[Tensor]) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            mode = _WholeReads(weights, make)
            mode.__enter__()
            active.append(mode)

        return hook

    def leave(module: nn.Module, args: Any, out: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    handles = []
    for owner, weights in owners.items():
        handles.append(owner.register_forward_pre_hook(enter(weights)))
        handles.append(owner.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while active:  # a forward that raised before its hook could leave
            active.pop().__exit__(None, None, None)


def position_buffer_leaves(
    model: nn.Module, make: Callable[[Tensor], Tensor]
) -> contextlib.AbstractContextManager[Any]:
    """While the model runs, what it reads from its position buffers
    (:func:`lxt_plus.engine.detect.position_buffers`), and a position embedding's weight read
    whole by the module that holds it (:func:`lxt_plus.engine.detect.position_weight_owners`),
    go through ``make`` (which returns a leaf); a model without either runs with no mode at all."""
    from lxt_plus.engine.detect import position_buffers, position_weight_owners

    tables, owners = position_buffers(model), position_weight_owners(model)
    stack = contextlib.ExitStack()
    if tables:
        stack.enter_context(_BufferReads(tables, make))
    if owners:
        stack.enter_context(_whole_reads(owners, make))
    return stack
