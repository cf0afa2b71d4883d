"""Attention rules with their own backward pass: exact forward, chunked backward.

The attention rules need the ordinary attention gradient, rescaled (AttnLRP: ``q`` and ``k`` ×¼,
``v`` ×½; AH-LRP: ``v`` only, the weights held constant). Letting autograd run through the
attention kernel works but costs memory on CPU: the fused SDPA backward keeps the output and its
log-sum-exp beside ``q, k, v``, and eager attention keeps every score-sized intermediate. Here the
forward pass is the model's own attention call under ``no_grad`` (so outputs are bit-identical to
the unpatched model) and the backward pass is written out. It keeps only ``q, k, v``:

    P = softmax(scale · Q Kᵀ + M),   O = P V
    dV = Pᵀ dO,   dS = P ⊙ (dO Vᵀ − rowsum(P ⊙ dO Vᵀ)),   dQ = scale · dS K,   dK = scale · dSᵀ Q

It runs in blocks of query rows, each only over the keys that some row of the block can see
(causal masks: the block's prefix), so a causal backward does a little over half the work of a
dense one and never builds a full score matrix. Each block holds whole rows of ``P``, so the
softmax backward needs neither the output nor a log-sum-exp. AH-LRP needs only ``dV``: two
products per block. ``P`` comes from the eager call when the model returns it (up to
``KEEP_WEIGHTS_UP_TO`` keys), else it is recomputed per block, so no layer keeps an n × n matrix
for long contexts. Batched upstream gradients (``autograd.grad(is_grads_batched=True)``) take a
dense path.

Which calls take it (:func:`own_backward`): AH-LRP always (two products per block instead of the
kernel's full backward), AttnLRP under checkpointing. AttnLRP without checkpointing keeps the
fused kernel's backward, with the rule's factors at ``q, k, v``: it keeps the output and the
log-sum-exp as well (linear in the context too), and it is the faster of the two (on CPU ours
measured 10–30% slower per layer at 1024–4096 tokens).

Under gradient checkpointing (:func:`replay_contexts`), the attention output computed in a
layer's forward pass is kept and handed back when the layer is recomputed for the backward pass:
our backward does not need the output's graph, so the recomputation skips the attention kernel and
costs only the layer's projections and MLP.
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from lxt_plus.engine.functional import acc, grad_scale

__all__ = [
    "AttentionSpec",
    "own_backward",
    "probs_match",
    "qkv_rule",
    "replay_contexts",
    "rule_attention",
    "rule_sdpa",
    "sdpa_spec",
]

# Query rows per block. Fewer rows skip more masked keys but make the products less efficient;
# 64 measured fastest on CPU at 256 and 1024 tokens. Blocks shrink to keep a block's score
# matrix (batch × heads × rows × keys) under MAX_BLOCK_ELEMENTS.
ROWS = 64
MAX_BLOCK_ELEMENTS = 1 << 24
# Eager attention's weights are kept for the backward pass (four products per block, no
# recomputation) up to this many keys; beyond, they are recomputed block by block, so that what a
# layer keeps grows linearly with the context (weights of 4096 keys in 30 layers of 9 heads would
# be 18 GB at 4096 tokens).
KEEP_WEIGHTS_UP_TO = 1024


@dataclass(frozen=True)
class AttentionSpec:
    """What the backward pass needs to know about one attention call.

    ``mask``: ``None``, boolean (``True`` = attend) or additive float, broadcastable to
    ``(batch, heads, queries, keys)``. ``causal``: SDPA's upper-left causal mask (only without
    ``mask``). ``qk_factor``: gradient factor of ``q`` and ``k``; ``None`` when the weights are
    constants (AH-LRP). ``v_factor``: gradient factor of ``v``.
    """

    scale: float
    mask: Tensor | None
    causal: bool
    qk_factor: float | None
    v_factor: float

    @classmethod
    def for_rule(
        cls, detach_weights: bool, *, scale: float, mask: Tensor | None, causal: bool
    ) -> AttentionSpec:
        """The spec of AH-LRP (``detach_weights``) or AttnLRP, with :func:`rule_factors`."""
        qk_factor, v_factor = rule_factors(detach_weights)
        return cls(scale=scale, mask=mask, causal=causal, qk_factor=qk_factor, v_factor=v_factor)


def rule_factors(detach_weights: bool) -> tuple[float | None, float]:
    """Gradient factors of ``(q and k, v)`` under an attention rule.

    AH-LRP (``detach_weights``): ``q`` and ``k`` get no gradient, ``v`` all of it (Ali et al.
    2022). AttnLRP: uniform split on ``A @ v`` (½ each) and on ``q @ kᵀ`` (½ of ½): ``q`` and
    ``k`` ¼, ``v`` ½ (Achtibat et al. 2024).
    """
    return (None, 1.0) if detach_weights else (0.25, 0.5)


def qkv_rule(q: Tensor, k: Tensor, v: Tensor, detach_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The attention rule as gradient factors at the inputs of an attention function, for calls
    whose backward pass stays autograd's (:func:`rule_factors`; ``None``: detached)."""
    qk_factor, v_factor = rule_factors(detach_weights)
    if qk_factor is None:
        return q.detach(), k.detach(), grad_scale(v, v_factor)
    return grad_scale(q, qk_factor), grad_scale(k, qk_factor), grad_scale(v, v_factor)


def _allowed(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _rows(mask: Tensor, r0: int, r1: int, n_keys: int) -> Tensor:
    """Rows ``[r0, r1)`` and the first ``n_keys`` keys of a mask (a size-1 query dim broadcasts)."""
    return mask[..., :n_keys] if mask.shape[-2] == 1 else mask[..., r0:r1, :n_keys]


def _key_limits(spec: AttentionSpec, n_q: int, n_keys: int, rows: int) -> list[int]:
    """For each block of ``rows`` query rows: one past the last key any of its rows can see (keys
    beyond get zero weight). Computed for all blocks at once, from one pass over the mask."""
    starts = range(0, n_q, rows)
    if spec.causal:
        return [min(n_keys, n_q, r0 + rows) for r0 in starts]
    if spec.mask is None:
        return [n_keys] * len(starts)
    allowed = _allowed(spec.mask[..., :n_keys])
    # last visible key + 1 per query row (0: the row sees no key and spreads its weight over all)
    position = torch.arange(1, n_keys + 1, device=allowed.device, dtype=torch.int32)
    last = (allowed * position).amax(-1)
    last = last.masked_fill(last == 0, n_keys).reshape(-1, allowed.shape[-2]).amax(0)
    if last.numel() == 1:  # one mask row broadcast to every query
        return [int(last)] * len(starts)
    return _blocks(last, rows).amax(-1).tolist()


def _rows_with_gradient(do: Tensor, rows: int) -> list[bool]:
    """For each block of ``rows`` query rows, whether any upstream gradient reaches it."""
    return _blocks(do.ne(0).any(-1).reshape(-1, do.shape[-2]).any(0), rows).any(-1).tolist()


def _blocks(per_row: Tensor, rows: int) -> Tensor:
    """A per-row vector as ``(blocks, rows)``, the last block padded with zeros (or ``False``)."""
    pad = (-per_row.shape[0]) % rows
    if pad:
        per_row = torch.cat([per_row, per_row.new_zeros(pad)])
    return per_row.reshape(-1, rows)


def _block_probs(
    q: Tensor, k: Tensor, spec: AttentionSpec, r0: int, r1: int, out: Tensor | None = None
) -> Tensor:
    """Attention weights of query rows ``[r0, r1)`` over the keys ``k`` (a prefix of all keys),
    written into ``out`` when it is given."""
    scores = (
        torch.matmul(q, k.transpose(-1, -2)) if out is None else torch.matmul(q, k.transpose(-1, -2), out=out)
    )
    return _softmax_in_place(scores, spec, r0, r1)


def _softmax_in_place(scores: Tensor, spec: AttentionSpec, r0: int, r1: int) -> Tensor:
    """``(…, rows, keys)`` raw scores ``q kᵀ`` of query rows ``[r0, r1)`` turned into attention
    weights in their own storage: scaled, masked, normalised (no temporary of their size)."""
    low = torch.finfo(scores.dtype).min
    scores.mul_(spec.scale)
    dead = None
    if spec.causal:  # only keys in [r0, r1) can lie above the diagonal of this block
        n = scores.shape[-1]
        if n > r0:
            cols = torch.arange(r0, n, device=scores.device)[None, :]
            above = cols > torch.arange(r0, r1, device=scores.device)[:, None]
            scores[..., r0:].masked_fill_(above, low)
    elif spec.mask is not None:
        m = _rows(spec.mask, r0, r1, scores.shape[-1])
        if m.dtype == torch.bool:
            scores.masked_fill_(~m, low)
            dead = ~m.any(-1, keepdim=True)
        else:
            scores.add_(m.to(scores.dtype))
            dead = torch.isneginf(m).all(-1, keepdim=True)
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    scores.div_(scores.sum(-1, keepdim=True))
    if dead is not None and bool(dead.any()):  # rows with no key: SDPA outputs zeros, so no gradient
        scores.masked_fill_(dead, 0.0)
    return scores


def _softmax_backward(dp: Tensor, p: Tensor) -> Tensor:
    """``p ⊙ (dp − rowsum(p ⊙ dp))``: the softmax backward, out of place (batched tensors too)."""
    return (dp - (dp * p).sum(-1, keepdim=True)) * p


def _repeat_kv(k: Tensor, v: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """Grouped-query attention: key/value head ``i // group`` serves query head ``i``."""
    group = n_heads // k.shape[-3]
    return (k, v) if group == 1 else (k.repeat_interleave(group, -3), v.repeat_interleave(group, -3))


def _sum_groups(grad: Tensor, n_kv_heads: int) -> Tensor:
    """Gradient per key/value head: the sum over the query heads it served (see :func:`_repeat_kv`)."""
    *lead, heads, n, d = grad.shape
    return grad if heads == n_kv_heads else grad.reshape(*lead, n_kv_heads, heads // n_kv_heads, n, d).sum(-3)


def _grads(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, probs: Tensor | None, spec: AttentionSpec
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """Rule gradients of ``q (b, hq, L, d)``, ``k, v (b, hk, S, d)`` for ``do (b, hq, L, dv)``.

    Batch and heads are flattened into one dimension of batched matrix products. The blocks'
    weights and their gradients live in buffers allocated once per call, and the gradients
    are accumulated in place (``baddbmm_``): a block allocates nothing of its size. (With glibc's
    malloc, a large temporary per block is a fresh ``mmap`` whose pages are faulted in anew; that
    made this backward twice as slow.)
    """
    dtype = acc(q).dtype
    q, k, v, do = (t.to(dtype).contiguous() for t in (q, k, v, do))
    b, hq, n_q, d = q.shape
    hk, n_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    k, v = _repeat_kv(k, v, hq)
    bh = b * hq
    q3, do3 = q.view(bh, n_q, d), do.view(bh, n_q, d_v)
    k3, v3 = k.reshape(bh, n_k, d), v.reshape(bh, n_k, d_v)
    need_qk = spec.qk_factor is not None
    dq3 = torch.zeros_like(q3) if need_qk else None
    dk3 = torch.zeros_like(k3) if need_qk else None
    dv3 = torch.zeros_like(v3)
    rows = max(1, min(ROWS, MAX_BLOCK_ELEMENTS // max(1, bh * n_k)))
    qk_scale = spec.scale * (spec.qk_factor or 0.0)
    limits, live = _key_limits(spec, n_q, n_k, rows), _rows_with_gradient(do, rows)
    size = bh * min(rows, n_q) * max(limits, default=0)
    p_buf = q.new_empty(size) if probs is None else None
    dp_buf = q.new_empty(size) if need_qk else None
    prod_buf = q.new_empty(size) if need_qk else None
    for r0, kc, has_grad in zip(range(0, n_q, rows), limits, live, strict=True):
        if not has_grad:  # no gradient reaches these rows (the last layer, off target)
            continue
        r1 = min(n_q, r0 + rows)
        shape = (bh, r1 - r0, kc)
        qb, dob, kb, vb = q3[:, r0:r1], do3[:, r0:r1], k3[:, :kc], v3[:, :kc]
        if probs is not None:
            p = probs[:, :, r0:r1, :kc].to(dtype).reshape(shape)
        else:
            assert p_buf is not None
            out = p_buf[: math.prod(shape)].view(b, hq, *shape[1:])
            p = _block_probs(q[:, :, r0:r1], k[:, :, :kc], spec, r0, r1, out=out).view(shape)
        dv3[:, :kc].baddbmm_(p.transpose(1, 2), dob)
        if need_qk:
            assert dq3 is not None and dk3 is not None and dp_buf is not None and prod_buf is not None
            dp = torch.bmm(dob, vb.transpose(1, 2), out=dp_buf[: math.prod(shape)].view(shape))
            # the softmax backward in place: ds = p ⊙ (dp − rowsum(p ⊙ dp))
            rowsum = torch.mul(dp, p, out=prod_buf[: math.prod(shape)].view(shape)).sum(-1, keepdim=True)
            ds = dp.sub_(rowsum).mul_(p)
            dq3[:, r0:r1].baddbmm_(ds, kb, beta=0.0, alpha=qk_scale)
            dk3[:, :kc].baddbmm_(ds.transpose(1, 2), qb, alpha=qk_scale)
    if spec.v_factor != 1.0:
        dv3.mul_(spec.v_factor)
    dq = None if dq3 is None else dq3.view(b, hq, n_q, d)
    dk = None if dk3 is None else _sum_groups(dk3.view(b, hq, n_k, d), hk)
    return dq, dk, _sum_groups(dv3.view(b, hq, n_k, d_v), hk)


def _is_batched(t: Tensor) -> bool:
    """Whether ``t`` is a vmap-batched tensor (legacy batching, as ``is_grads_batched`` uses, or functorch)."""
    f = torch._C._functorch
    return bool(f.is_legacy_batchedtensor(t) or f.is_batchedtensor(t))


def _batched_grads(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, probs: Tensor | None, spec: AttentionSpec
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """:func:`_grads` for a batch of upstream gradients (``autograd.grad(is_grads_batched=True)``).

    Under batching, ``do`` is a batched tensor: the same blocks of query rows over their visible
    keys, but no data-dependent skips, and the gradients are accumulated in buffers made from
    ``do`` (so they are batched too) rather than in shared ones.
    """
    dtype = acc(q).dtype
    q, k, v, do = (t.to(dtype) for t in (q, k, v, do))
    b, hq, n_q, _ = q.shape
    hk, n_k = k.shape[1], k.shape[2]
    k, v = _repeat_kv(k, v, hq)
    need_qk = spec.qk_factor is not None
    rows = max(1, min(ROWS, MAX_BLOCK_ELEMENTS // max(1, b * hq * n_k)))
    qk_scale = spec.scale * (spec.qk_factor or 0.0)
    zero = do.sum(-2, keepdim=True).mul(0)  # a batched (b, hq, 1, dv) zero
    dv = zero.expand(*do.shape[:2], n_k, do.shape[-1]).contiguous()
    dk = zero[..., :1].expand(*q.shape[:2], n_k, q.shape[-1]).contiguous() if need_qk else None
    dq_blocks: list[Tensor] = []
    for r0, kc in zip(range(0, n_q, rows), _key_limits(spec, n_q, n_k, rows), strict=True):
        r1 = min(n_q, r0 + rows)
        qb, dob = q[:, :, r0:r1], do.narrow(2, r0, r1 - r0)  # narrow: batched tensors take no [:, :]
        kb, vb = k[:, :, :kc], v[:, :, :kc]
        p = probs[:, :, r0:r1, :kc].to(dtype) if probs is not None else _block_probs(qb, kb, spec, r0, r1)
        dv.narrow(2, 0, kc).add_(torch.matmul(p.transpose(-1, -2), dob))
        if need_qk:
            assert dk is not None
            ds = _softmax_backward(torch.matmul(dob, vb.transpose(-1, -2)), p)
            dq_blocks.append(torch.matmul(ds, kb) * qk_scale)
            dk.narrow(2, 0, kc).add_(torch.matmul(ds.transpose(-1, -2), qb), alpha=qk_scale)
    dq = torch.cat(dq_blocks, -2) if need_qk else None
    if spec.v_factor != 1.0:
        dv = dv * spec.v_factor
    return dq, None if dk is None else _sum_groups(dk, hk), _sum_groups(dv, hk)


class _RuleAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,  # type: ignore[override]
        probs: Tensor | None,
        spec: AttentionSpec,
        heads_last: bool,
    ) -> Tensor:
        ctx.spec, ctx.heads_last = spec, heads_last
        ctx.save_for_backward(q, k, v, probs)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, probs = ctx.saved_tensors
        do = grad.transpose(1, 2) if ctx.heads_last else grad
        if _is_batched(grad):
            dq, dk, dv = _batched_grads(q, k, v, do, probs, ctx.spec)  # is_grads_batched
        else:
            dq, dk, dv = _grads(q, k, v, do, probs, ctx.spec)
        grads = tuple(
            g.to(q.dtype) if g is not None and need else None
            for g, need in zip((dq, dk, dv), ctx.needs_input_grad[:3], strict=True)
        )
        return (*grads, None, None, None, None)


def rule_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    spec: AttentionSpec,
    probs: Tensor | None = None,
    heads_last: bool = False,
) -> Tensor:
    """``out`` (computed without gradient) with the attention rule as its backward pass.

    ``heads_last``: ``out`` is laid out ``(batch, queries, heads, dim)`` (transformers' attention
    functions) rather than ``(batch, heads, queries, dim)`` (``scaled_dot_product_attention``).
    """
    if spec.qk_factor is None:
        q, k = q.detach(), k.detach()
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in (q, k, v)):
        return out
    if probs is not None and probs.shape[-1] > KEEP_WEIGHTS_UP_TO:
        probs = None  # recomputed per block in the backward pass: memory linear in the context
    return _RuleAttention.apply(
        q, k, v, out.detach(), None if probs is None else probs.detach(), spec, heads_last
    )


def probs_match(q: Tensor, k: Tensor, probs: Tensor, mask: Tensor | None, scale: float) -> bool:
    """Whether ``probs`` is ``softmax(scale · q kᵀ + mask)``, checked on the last query row.

    Guards the eager fast path: a family whose attention adds anything else to the scores
    (soft-capping, sinks, head masks) fails the check and keeps autograd's backward.
    """
    b, hq, n_q, _ = q.shape
    hk = k.shape[1]
    if probs.shape != (b, hq, n_q, k.shape[2]) or hq % hk:
        return False
    kr, _ = _repeat_kv(k, k, hq)
    # scores in the model's dtype and softmax in float32 or wider, as eager attention computes them
    scores = torch.matmul(q[:, :, -1:], kr.transpose(-1, -2)) * scale
    if mask is not None:
        m = mask[..., -1:, : k.shape[2]]
        scores = (
            scores.masked_fill(~m, torch.finfo(scores.dtype).min) if m.dtype == torch.bool else scores + m
        )
    expected = torch.softmax(scores, -1, dtype=acc(scores).dtype)
    got = probs[:, :, -1:].to(expected.dtype)
    tol = 1e-3 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return bool(torch.allclose(got, expected, rtol=10 * tol, atol=tol))


class _Replay:
    """The attention outputs of one checkpointed call, in call order: kept while its forward pass
    records them, handed back in the same order each time the call is recomputed."""

    def __init__(self) -> None:
        self.outputs: list[Tensor] = []
        self.index = 0
        self.replaying = False


_REPLAY: contextvars.ContextVar[_Replay | None] = contextvars.ContextVar("lxt_plus_replay", default=None)


class _ReplayContext:
    """Sets the store of one checkpointed call as current; re-entrant, since a graph kept for
    several backward passes (``retain_graph``) is recomputed once per pass."""

    def __init__(self, store: _Replay, replaying: bool) -> None:
        self.store, self.replaying = store, replaying
        self._tokens: list[contextvars.Token[_Replay | None]] = []

    def __enter__(self) -> None:
        self.store.replaying, self.store.index = self.replaying, 0
        self._tokens.append(_REPLAY.set(self.store))

    def __exit__(self, *exc: object) -> None:
        _REPLAY.reset(self._tokens.pop())


def replay_contexts() -> tuple[_ReplayContext, _ReplayContext]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint`` (non-reentrant): the forward context
    records each attention output of the call, the recompute context hands them back, so the
    recomputation runs no attention kernel. Outputs are the same tensors, so relevance is
    bit-identical to checkpointing without the replay."""
    store = _Replay()
    return _ReplayContext(store, False), _ReplayContext(store, True)


def own_backward(q: Tensor) -> bool:
    """Whether an AttnLRP call takes our backward pass rather than the fused kernel's: under
    checkpointing, where memory comes first and the recomputation can then skip the kernel (see
    :func:`replay_contexts`). ``q`` is the call's query (the choice may depend on its device)."""
    del q
    return _REPLAY.get() is not None


def _attention_output(compute: Callable[[], Tensor], shape: tuple[int, ...]) -> Tensor:
    """``compute()`` without gradient; under checkpointing, recorded in the forward pass and
    handed back instead of recomputed (``shape`` guards the order: a mismatch recomputes)."""
    store = _REPLAY.get()
    if store is not None and store.replaying and store.index < len(store.outputs):
        kept = store.outputs[store.index]
        store.index += 1
        if tuple(kept.shape) == shape:
            return kept
    with torch.no_grad():
        out = compute()
    if store is not None and not store.replaying:
        store.outputs.append(out)
    return out


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_spec(
    args: tuple[Any, ...], kwargs: dict[str, Any], detach_weights: bool
) -> tuple[dict[str, Any], AttentionSpec | None]:
    """The arguments of a ``scaled_dot_product_attention`` call by name (dropout off), and the
    :class:`AttentionSpec` of the rule, or ``None`` for calls our backward does not cover (a mask
    that itself needs a gradient, arguments we do not know)."""
    bound: dict[str, Any] = dict(zip(_SDPA_PARAMS, args, strict=False))
    known = (
        len(args) <= len(_SDPA_PARAMS)
        and not (set(kwargs) - set(_SDPA_PARAMS))
        and not (set(bound) & set(kwargs))
    )
    bound.update(kwargs)
    bound["dropout_p"] = 0.0
    q, k, v, mask = (bound.get(n) for n in ("query", "key", "value", "attn_mask"))
    if detach_weights and isinstance(mask, Tensor) and mask.requires_grad:
        # a mask computed from the input (Doge's dynamic mask) shapes only the weights, which
        # AH-LRP holds constant: no relevance flows through it
        mask = bound["attn_mask"] = mask.detach()
    if not (
        known
        and all(isinstance(t, Tensor) for t in (q, k, v))
        and (mask is None or (isinstance(mask, Tensor) and not mask.requires_grad))
    ):
        return bound, None
    scale = bound.get("scale")
    return bound, AttentionSpec.for_rule(
        detach_weights,
        scale=float(scale) if scale is not None else q.shape[-1] ** -0.5,  # type: ignore[union-attr]
        mask=mask,
        causal=bool(bound.get("is_causal")) and mask is None,
    )


def rule_sdpa(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], detach_weights: bool
) -> tuple[Any, bool]:
    """``scaled_dot_product_attention`` under an attention rule. Dropout is off.

    torch's kernel without gradient, then our backward pass: for AH-LRP always (the value
    gradient only, two products per block instead of the kernel's full backward), for AttnLRP
    where :func:`own_backward` says so. Otherwise, and for calls :func:`sdpa_spec` does not
    cover, autograd runs through the kernel with the rule's factors at ``q, k, v``. Returns the
    output and whether our backward pass is attached (the tests check the routing with it).
    """
    bound, spec = sdpa_spec(args, kwargs, detach_weights)
    q, k, v = (bound.get(n) for n in _SDPA_PARAMS[:3])
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return func(*args, **kwargs), False  # not a call torch accepts: let torch say so
    assert isinstance(q, Tensor) and isinstance(v, Tensor)
    rest = {n: x for n, x in bound.items() if n not in _SDPA_PARAMS[:3]}
    if spec is None or not (detach_weights or own_backward(q)):
        return func(*qkv_rule(q, k, v, detach_weights), **rest), False  # type: ignore[arg-type]
    shape = (*q.shape[:-1], v.shape[-1])
    out = _attention_output(lambda: func(q, k, v, **rest), shape)
    return rule_attention(q, k, v, out, spec), True  # type: ignore[arg-type]


def _sdpa_mask(attn: Tensor | None, padding: Tensor | None, batch: int, heads: int) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks (``True`` or ``-inf`` marks a key to ignore; ``attn`` is
    ``(L, S)`` or ``(batch * heads, L, S)``, ``padding`` ``(batch, S)``) as one mask for
    ``scaled_dot_product_attention`` (boolean ``True`` keeps; a float mask is added)."""
    masks = []
    if attn is not None:
        masks.append(attn[None, None] if attn.dim() == 2 else attn.reshape(batch, heads, *attn.shape[1:]))
    if padding is not None:
        masks.append(padding[:, None, None, :])
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep
    total: Tensor | None = None
    for m in masks:
        add = (
            torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(m, float("-inf"))
            if m.dtype == torch.bool
            else m
        )
        total = add if total is None else total + add
    return total


_MHA_PARAMS = tuple(inspect.signature(F.multi_head_attention_forward).parameters)


def rule_mha(
    args: tuple[Any, ...], kwargs: dict[str, Any], detach_weights: bool
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``: SigLIP's pooling head) as its
    in-projections, :func:`rule_sdpa` and the out-projection, so the attention rule applies. Inputs
    are ``(length, batch, embed)`` as torch passes them. Dropout is off; ``bias_k``/``bias_v``,
    ``add_zero_attn`` and static keys are refused by name. The weights it returns, when asked for,
    are computed without gradient (they are not on the relevance path)."""
    from lxt_plus.errors import UnsupportedModelError

    a = dict(zip(_MHA_PARAMS, args, strict=False))
    a.update(kwargs)
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a.get(name) is not None:
            raise UnsupportedModelError(
                f"nn.MultiheadAttention with {name} has no attention rule in lxt_plus"
            )
    if a.get("add_zero_attn"):
        raise UnsupportedModelError(
            "nn.MultiheadAttention with add_zero_attn has no attention rule in lxt_plus"
        )
    query, key, value = a["query"], a["key"], a["value"]
    heads, embed = int(a["num_heads"]), query.shape[-1]
    w_in, b_in = a.get("in_proj_weight"), a.get("in_proj_bias")
    if a.get("use_separate_proj_weight"):
        weights = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
    else:
        weights = tuple(w_in.chunk(3)) if w_in is not None else ()
    biases = tuple(b_in.chunk(3)) if b_in is not None else (None, None, None)
    q, k, v = (F.linear(t, w, b) for t, w, b in zip((query, key, value), weights, biases, strict=True))

    def heads_first(t: Tensor) -> Tensor:  # (L, B, E) -> (B, heads, L, E / heads)
        return t.reshape(t.shape[0], t.shape[1], heads, embed // heads).permute(1, 2, 0, 3)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    mask = _sdpa_mask(a.get("attn_mask"), a.get("key_padding_mask"), q.shape[0], heads)
    causal = bool(a.get("is_causal")) and mask is None
    out, _ = rule_sdpa(
        F.scaled_dot_product_attention, (q, k, v), {"attn_mask": mask, "is_causal": causal}, detach_weights
    )
    out = out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], embed)
    out = F.linear(out, a["out_proj_weight"], a.get("out_proj_bias"))
    probs = None
    if a.get("need_weights", True):
        with torch.no_grad():
            scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5)
            if isinstance(mask, Tensor):
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            probs = scores.softmax(-1)
            probs = probs.mean(1) if a.get("average_attn_weights", True) else probs
    return out, probs
