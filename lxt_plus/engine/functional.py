"""Autograd functions behind the rules (the Gradient×Input framework, Arras et al. 2025).

With these backward passes, ``x * x.grad`` after one backward pass from the target logit is the
LRP relevance of ``x``. Each function changes only the backward pass; forward values are exact.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lxt_plus.errors import UnsupportedModelError

__all__ = [
    "stabilize",
    "grad_scale",
    "identity_rule",
    "epsilon_rule",
    "acc",
    "uniform_mul",
    "uniform_matmul",
    "Term",
    "LinearMap",
    "modified_linear",
    "input_relevance",
    "zennit_stabilize",
]


def acc(x: Tensor) -> Tensor:
    """``x`` in the accumulation dtype: float32 for half precision, else unchanged (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def stabilize(x: Tensor, eps: float) -> Tensor:
    """``x + eps * sign(x)`` with ``sign(±0) = ±1``: keeps denominators away from zero, sign kept.

    ``copysign`` is one fused kernel; ``torch.where`` on a boolean mask with scalar branches is
    several times slower on CPU and sat on the hot path of every identity and ε rule.
    """
    return torch.copysign(torch.tensor(eps, dtype=x.dtype, device=x.device), x).add_(x)


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float, fresh: bool) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        # A view of a custom function's output may not be modified in place (autograd would replace
        # this backward); an alias made by ``detach`` is no view, and in-place ops on it are recorded
        # on top of this node as usual. It is only safe when nothing else reads ``x`` (``fresh``).
        return x.detach() if fresh else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        return grad * ctx.factor, None, None


def grad_scale(x: Tensor, factor: float, *, fresh: bool = False) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass.

    ``fresh=True`` says that ``x`` is a temporary nothing else reads (an operation's output that the
    result replaces): the result may then be modified in place, as model code does with attention
    scores (Falcon's ``scores /= sqrt(d)``). Otherwise it is a view of ``x``, and an in-place change
    raises rather than going unseen by a reader of ``x``. Neither copies.
    """
    if factor == 1.0 or not x.requires_grad:
        return x
    return _GradScale.apply(x, factor, fresh)


class _IdentityRule(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        fn: Callable[[Tensor], Tensor],
        eps: float,  # type: ignore[override]
        ratio_fn: Callable[[Tensor], Tensor] | None,
    ) -> Tensor:
        version = x._version
        y = fn(x)
        ctx.dtype, ctx.fn, ctx.ratio_fn = x.dtype, fn, None
        if ratio_fn is not None and x._version == version and y.data_ptr() != x.data_ptr():
            # f(x) / x has a closed form: keep x and recompute the ratio in the backward pass (one
            # kernel), so that a product with this output can keep x too (``uniform_mul``)
            ctx.ratio_fn = ratio_fn
            ctx.save_for_backward(x)
            return y
        # grad_in = grad_out * f(x) / x, so that x * grad_in = f(x) * grad_out = R(y).
        ratio = ratio_fn(acc(x)) if ratio_fn is not None else acc(y) / stabilize(acc(x), eps)
        ctx.save_for_backward(ratio)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        ratio = saved if ctx.ratio_fn is None else ctx.ratio_fn(acc(saved))
        return (acc(grad) * ratio).to(ctx.dtype), None, None, None


def _identity_input(t: Tensor) -> tuple[Tensor, Any] | None:
    """``(x, node)`` when ``t`` is the output of :func:`identity_rule` on ``x`` with a closed-form
    ratio (the node keeps ``x``, not the ratio), else ``None``. A tensor whose gradient is read
    (``retain_grad``, a hook) is not fused past."""
    node = t.grad_fn
    if type(node).__name__ != "_IdentityRuleBackward" or getattr(node, "ratio_fn", None) is None:
        return None
    if t.retains_grad or t._backward_hooks:  # someone reads this tensor's gradient: keep it in the graph
        return None
    (x,) = node.saved_tensors  # type: ignore[union-attr]
    return (x, node) if x.shape == t.shape else None


def identity_rule(
    x: Tensor,
    fn: Callable[[Tensor], Tensor],
    eps: float = 1e-12,
    ratio: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``fn(x)`` whose backward passes relevance through unchanged (identity rule).

    For an element-wise non-linearity ``y = f(x)`` the identity rule sets ``R(x) = R(y)``
    (Achtibat et al. 2024, Sec. 3.3.2). In the Gradient×Input framework the backward pass is
    ``grad * f(x) / x``, stabilised near ``x = 0`` by a sign-preserving ``eps``. ``ratio``, when
    given, is ``f(x) / x`` in closed form (``sigmoid`` for SiLU): one kernel, exact at ``x = 0``.
    """
    if not x.requires_grad or not torch.is_grad_enabled():
        return fn(x)
    return _IdentityRule.apply(x, fn, eps, ratio)


class _EpsilonRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        ratio = acc(z) / stabilize(acc(z), eps)
        ctx.save_for_backward(ratio)
        # an alias, not a view: modules modify a Linear's output in place (Falcon's scores /= √d),
        # which autograd forbids on a view made inside a custom function; the output is a
        # temporary that nothing else reads, and the ratio is already saved
        return z.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return (acc(grad) * ratio).to(grad.dtype), None


def epsilon_rule(z: Tensor, eps: float) -> Tensor:
    """Applied to the output ``z`` of a linear layer: the LRP-ε rule (Bach et al. 2015).

    ``R_i = Σ_j x_i w_ij R_j / (z_j + ε sign z_j)``; the upstream gradient is scaled by
    ``z / (z + ε sign z)``. ``eps = 0`` is plain Gradient×Input (LRP-0).
    """
    if eps == 0.0 or not z.requires_grad:
        return z
    return _EpsilonRule.apply(z, eps)


def _half_product(grad: Tensor, other: Tensor, like: Tensor) -> Tensor:
    """``0.5 * grad * other`` in one kernel, reduced and cast to the factor ``like`` it is for."""
    out = torch.addcmul(grad.new_zeros(()), grad, other, value=0.5)
    return out.sum_to_size(like.shape).to(like.dtype)


class _UniformMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        return (_half_product(grad, b, a) if need_a else None, _half_product(grad, a, b) if need_b else None)


class _UniformGatedMul(torch.autograd.Function):
    """``f(x) * b`` under the uniform rule, with the identity rule on ``f``: the backward pass
    recomputes ``f(x)`` and ``f(x) / x`` from ``x`` instead of keeping ``f(x)`` as well, so a gated
    MLP keeps two activations per token where the two rules apart keep three. The gradients are
    those of :class:`_UniformMul` followed by :class:`_IdentityRule`, operation for operation."""

    @staticmethod
    def forward(ctx, x: Tensor, b: Tensor, a: Tensor, node: Any) -> Tensor:  # type: ignore[override]
        ctx.fn, ctx.ratio_fn, ctx.dtype = node.fn, node.ratio_fn, node.dtype
        ctx.save_for_backward(x, b)
        return a * b

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        x, b = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[:2]
        grad_x = grad_b = None
        if need_x:
            grad_a = _half_product(grad, b, x)
            grad_x = (acc(grad_a) * ctx.ratio_fn(acc(x))).to(ctx.dtype)
        if need_b:
            grad_b = _half_product(grad, ctx.fn(x), b)
        return grad_x, grad_b, None, None


def uniform_mul(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` where both factors depend on the input: each factor receives half the relevance.

    Uniform rule for bilinear products (Achtibat et al. 2024, Prop. 3.3). Plain Gradient×Input
    would hand the full relevance to both factors and double the total. The backward pass is the
    product rule with the ½ folded in: one fused ``addcmul`` per factor, as many kernels as the
    plain product's backward. When a factor is the output of :func:`identity_rule` (``act(gate)``
    in a gated MLP), the product keeps the activation's input, which that rule keeps anyway.
    """
    if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
        return a * b
    for first, other in ((a, b), (b, a)):
        found = _identity_input(first)
        if found is not None and first.dtype == other.dtype:
            x, node = found
            return _UniformGatedMul.apply(x, other, first.detach(), node)
    return _UniformMul.apply(a, b)


def uniform_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with the uniform rule (see :func:`uniform_mul`); the result may be modified in place."""
    return grad_scale(torch.matmul(a, b), 0.5, fresh=True)


# ------------------------------------------------------------------ rules that modify a linear map
# Relevance recorded for inputs that are the explained leaf itself (see ``input_relevance``).
_EXACT_INPUT: contextvars.ContextVar[dict[int, list[Tensor]] | None] = contextvars.ContextVar(
    "lxt_plus_exact_input", default=None
)


@contextlib.contextmanager
def input_relevance() -> Iterator[dict[int, list[Tensor]]]:
    """Collect corrections for rules whose relevance at a leaf input is not ``x * grad``.

    Rules with constant input terms (z^B, flat, w²) give relevance even where an input is ``0``,
    which a gradient (``R / x``) cannot carry. While this context is active, such a rule applied
    directly to a leaf tensor ``x`` (the explained input) appends ``R_exact - x * grad`` to
    ``found[id(x)]``, so that ``x * x.grad + sum(found[id(x)])`` is exactly the rule's relevance.
    """
    found: dict[int, list[Tensor]] = {}
    token = _EXACT_INPUT.set(found)
    try:
        yield found
    finally:
        _EXACT_INPUT.reset(token)


def zennit_stabilize(x: Tensor, eps: float) -> Tensor:
    """``x + eps * sign(x)`` with ``sign(0) = +1`` for both zeros (zennit's stabiliser)."""
    return torch.where(x >= 0, x + eps, x - eps)


@dataclass(frozen=True)
class Term:
    """One modified copy of a linear map, as in zennit's ``BasicHook``.

    ``inputs`` is ``"x"``, ``"pos"`` (``x⁺``), ``"neg"`` (``x⁻``), ``"ones"``, ``"low"`` or
    ``"high"`` (the bounds of z^B); ``param`` modifies the weight and the bias (``None``: keep);
    ``zero_bias`` drops the bias. Terms with the same ``group`` share a denominator
    ``Σ sign·z_term``; ``mask`` (``"pos"``/``"neg"``) keeps only outputs whose unmodified value
    has that sign; the input relevance is ``Σ coef · input_term ⊙ grad_term``.
    """

    inputs: str
    param: Callable[[Tensor], Tensor] | None = None
    zero_bias: bool = False
    group: int = 0
    sign: float = 1.0
    coef: float = 1.0
    mask: str | None = None


class LinearMap:
    """``apply(x, weight, bias)`` and the input gradient of a linear module: Linear, HF Conv1D, ConvNd."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        if isinstance(module, nn.Linear):
            self.kind = "linear"
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style
            self.kind = "conv1d-hf"
        elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
            self.kind = "conv"
        else:
            raise UnsupportedModelError(
                f"{type(module).__name__} is not a linear map (Linear, transformers' Conv1D or ConvNd)"
            )

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv1d-hf":  # weight (in, out)
            out = x.matmul(weight)
            return out if bias is None else out + bias
        return cast(Any, self.module)._conv_forward(x, weight, bias)

    def input_grad(self, grad: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        """The gradient of ``apply(x, weight, ·)`` with respect to ``x``, for the upstream ``grad``."""
        if self.kind == "linear":
            return grad.matmul(weight)
        if self.kind == "conv1d-hf":
            return grad.matmul(weight.t())
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.apply(xs, weight, None), xs, grad)
        return g


def _term_input(x: Tensor, kind: str, low: Tensor | None, high: Tensor | None, channel_dim: int) -> Tensor:
    if kind == "x":
        return x
    if kind == "pos":
        return x.clamp(min=0)
    if kind == "neg":
        return x.clamp(max=0)
    if kind == "ones":
        return torch.ones_like(x)
    bound = low if kind == "low" else high
    assert bound is not None
    bound = bound.to(x)
    if bound.dim() == 1 and bound.numel() > 1:  # one value per channel
        shape = [1] * x.dim()
        shape[channel_dim] = bound.numel()
        bound = bound.view(shape)
    return bound.expand_as(x)


_PROPORTIONAL = frozenset({"x", "pos", "neg"})  # inputs whose relevance is x ⊙ (a gradient)


def _dequantized(weight: Tensor) -> Tensor:
    """A quantized weight (a tensor subclass such as torchao's ``Int8Tensor``) as a plain tensor,
    for the rules that compute with the weight itself (γ and z⁺ split it by sign). Kept quantized
    until the backward pass, then dequantized one layer at a time."""
    if not hasattr(type(weight), "__tensor_flatten__"):
        return weight
    dequantize = getattr(weight, "dequantize", None)
    if not callable(dequantize):
        raise UnsupportedModelError(
            f"the weight is a {type(weight).__name__}, which this rule cannot read without a "
            "dequantize() method; use a rule that keeps linear layers as they are (attnlrp, cp-lrp)"
        )
    return cast(Tensor, dequantize())


class _ModifiedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        forward: Callable[[Tensor], Tensor],
        lin: LinearMap,  # type: ignore[override]
        terms: tuple[Term, ...],
        eps: float,
        bounds: tuple[Tensor | None, Tensor | None],
    ) -> Tensor:
        z = forward(x)
        # the parameters are read now: accelerate may offload them again before the backward pass
        weight = cast(Tensor, lin.module.weight).detach()
        bias = getattr(lin.module, "bias", None)
        ctx.save_for_backward(x, weight, None if bias is None else bias.detach())
        ctx.lin, ctx.terms, ctx.eps, ctx.bounds = lin, terms, eps, bounds
        ctx.record, ctx.leaf_shape = None, None
        constant_inputs = not callable(terms) and any(t.inputs not in _PROPORTIONAL for t in terms)
        ctx.constant_inputs = constant_inputs
        store = _EXACT_INPUT.get()
        if constant_inputs and store is not None:
            leaf = _leaf_behind(x)
            if leaf is not None:
                ctx.record, ctx.leaf_shape = store.setdefault(id(leaf), []), leaf.shape
            elif bool((x == 0).any()):
                warnings.warn(
                    f"{type(lin.module).__name__}: a rule with constant input terms (z^B, flat, w²) gives "
                    "relevance to inputs that are exactly 0, which lxt_plus can report only when the rule is "
                    "applied to the explained input itself; here its input is computed, so the relevance of "
                    "its zero inputs is lost. Apply the rule to the input layer only.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return z

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, raw_weight, raw_bias = ctx.saved_tensors
        raw_weight = _dequantized(raw_weight)
        lin, terms, eps = ctx.lin, ctx.terms, ctx.eps
        xa, weight = acc(x), acc(raw_weight)
        bias = None if raw_bias is None else acc(raw_bias)
        # the output is recomputed (not saved): a module may modify its output in place
        za = lin.apply(xa, weight, bias)
        r_out = za * acc(grad)  # relevance at the output: R(z) = z ⊙ grad
        if callable(terms):  # a rule with its own closed form (the generalised γ)
            return terms(lin, xa, weight, bias, za, r_out, eps).to(x.dtype), None, None, None, None, None
        ins, weights, outs = [], [], []
        for t in terms:
            low, high = ctx.bounds
            xi = _term_input(xa, t.inputs, low, high, 1 if lin.kind == "conv" else -1)
            w = weight if t.param is None else t.param(weight)
            b = None if (bias is None or t.zero_bias) else (bias if t.param is None else t.param(bias))
            ins.append(xi)
            weights.append(w)
            outs.append(lin.apply(xi, w, b))
        denom: dict[int, Tensor] = {}
        for t, o in zip(terms, outs, strict=True):
            denom[t.group] = denom[t.group] + t.sign * o if t.group in denom else t.sign * o
        r_in = grad_x = None
        exact = not ctx.constant_inputs
        for t, xi, w in zip(terms, ins, weights, strict=True):
            g_out = r_out / zennit_stabilize(denom[t.group], eps)
            if t.mask is not None:
                g_out = g_out * ((za > 0) if t.mask == "pos" else (za < 0)).to(g_out.dtype)
            g_in = lin.input_grad(g_out, w, xi)
            if exact:  # x ⊙ d/dx equals input_term ⊙ d/d(input_term): no division by x needed
                if t.inputs == "pos":
                    g_in = g_in * (xa > 0).to(g_in.dtype)
                elif t.inputs == "neg":
                    g_in = g_in * (xa < 0).to(g_in.dtype)
                grad_x = t.coef * g_in if grad_x is None else grad_x + t.coef * g_in
            else:
                part = t.coef * xi * g_in
                r_in = part if r_in is None else r_in + part
        if r_in is not None:  # constant inputs: relevance / x, made exact at the explained leaf
            grad_x = torch.where(xa == 0, torch.zeros_like(r_in), r_in / xa)
            if ctx.record is not None:
                ctx.record.append((r_in - xa * grad_x).reshape(ctx.leaf_shape))
        assert grad_x is not None
        return grad_x.to(x.dtype), None, None, None, None, None


def generalized_gamma_grad(gamma: float) -> Callable[..., Tensor]:
    """The input gradient of the generalised γ-rule in closed form: 4 products instead of 9.

    With ``P = |W| |x|`` the two denominators (outputs > 0 and < 0) are
    ``z + γ/2 (Wx + P) + γ b⁺`` and ``z + γ/2 (Wx − P) + γ b⁻``, and with ``s₊, s₋`` the
    output relevance over them (each masked by the output's sign) the gradient is
    ``[x ≠ 0] (1 + γ/2) Wᵀ(s₊ + s₋) + sign(x) γ/2 |W|ᵀ(s₊ − s₋)``. It is the same rule as the four
    :class:`Term` s of :class:`~lxt_plus.engine.rules.Gamma` (zennit's ``Gamma``), summed by hand.
    """

    def grad(
        lin: LinearMap, x: Tensor, weight: Tensor, bias: Tensor | None, z: Tensor, r_out: Tensor, eps: float
    ) -> Tensor:
        w_abs = weight.abs()
        if bias is not None and lin.kind == "conv":  # (channels,) against (batch, channels, *spatial)
            bias = bias.view(-1, *([1] * (z.dim() - 2)))
        wx = z if bias is None else z - bias
        p = lin.apply(x.abs(), w_abs, None)
        d_pos, d_neg = z + gamma / 2 * (wx + p), z + gamma / 2 * (wx - p)
        if bias is not None:
            d_pos, d_neg = d_pos + gamma * bias.clamp(min=0), d_neg + gamma * bias.clamp(max=0)
        s_pos = torch.where(z > 0, r_out / zennit_stabilize(d_pos, eps), 0.0)
        s_neg = torch.where(z < 0, r_out / zennit_stabilize(d_neg, eps), 0.0)
        g = lin.input_grad(s_pos + s_neg, weight, x).mul_((x != 0).to(x.dtype)).mul_(1 + gamma / 2)
        return g.add_(lin.input_grad(s_pos - s_neg, w_abs, x).mul_(x.sign()), alpha=gamma / 2)

    return grad


def _leaf_behind(x: Tensor) -> Tensor | None:
    """The leaf tensor ``x`` is, or is a reshaped view of (``nn.Flatten``), else ``None``."""
    if x.is_leaf:
        return x
    base = x._base
    if (
        base is not None
        and base.is_leaf
        and base.numel() == x.numel()
        and base.is_contiguous()
        and x.is_contiguous()
        and base.data_ptr() == x.data_ptr()
    ):
        return base
    return None


def modified_linear(
    x: Tensor,
    forward: Callable[[Tensor], Tensor],
    lin: LinearMap,
    terms: tuple[Term, ...],
    eps: float,
    bounds: tuple[Tensor | None, Tensor | None] = (None, None),
) -> Tensor:
    """``forward(x)`` whose backward pass is the LRP rule given by ``terms`` (zennit's formulation).

    The forward value is exact; the backward pass recomputes the modified maps from the saved
    input, so nothing beyond ``x`` and the output is kept. Parameters get no gradient.
    """
    if not torch.is_grad_enabled() or not x.requires_grad:
        return forward(x)
    return _ModifiedLinear.apply(x, forward, lin, terms, eps, bounds)
