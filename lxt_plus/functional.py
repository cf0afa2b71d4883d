"""Autograd functions behind the rules (the Gradient×Input framework, Arras et al. 2025).

With these backward passes, ``x * x.grad`` after one backward pass from the target logit is the
LRP relevance of ``x``. Each function changes only the backward pass; forward values are exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "stabilize",
    "grad_scale",
    "identity_rule",
    "epsilon_rule",
    "acc",
    "uniform_mul",
    "uniform_matmul",
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
    def forward(ctx, x: Tensor, factor: float) -> Tensor:  # type: ignore[override]
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass."""
    if factor == 1.0 or not x.requires_grad:
        return x
    return _GradScale.apply(x, factor)


class _IdentityRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor], eps: float,  # type: ignore[override]
                ratio_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
        y = fn(x)
        # grad_in = grad_out * f(x) / x, so that x * grad_in = f(x) * grad_out = R(y).
        ratio = ratio_fn(acc(x)) if ratio_fn is not None else acc(y) / stabilize(acc(x), eps)
        ctx.save_for_backward(ratio)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return (acc(grad) * ratio).to(ctx.dtype), None, None, None


def identity_rule(x: Tensor, fn: Callable[[Tensor], Tensor], eps: float = 1e-12,
                  ratio: Callable[[Tensor], Tensor] | None = None) -> Tensor:
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
        return z.view_as(z)

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


def uniform_mul(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` where both factors depend on the input: each factor receives half the relevance.

    Uniform rule for bilinear products (Achtibat et al. 2024, Prop. 3.3). Plain Gradient×Input
    would hand the full relevance to both factors and double the total. The backward pass is the
    product rule with the ½ folded in: one fused ``addcmul`` per factor, as many kernels as the
    plain product's backward.
    """
    if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad):
        return a * b
    return _UniformMul.apply(a, b)


def uniform_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with the uniform rule (see :func:`uniform_mul`)."""
    return grad_scale(torch.matmul(a, b), 0.5)
