"""Each LRP rule of lxt_plus against a slow reference written straight from its paper's formula.

The references below use explicit loops or explicit matrices in float64; no autograd is used on
the reference side. The library side patches a small module, runs one backward pass from a random
upstream gradient ``g`` at the output ``y`` and reads the input relevance as ``x * x.grad``.
The output relevance the reference starts from is therefore ``R(y) = y * g``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

import lxt_plus
from lxt_plus.engine.rules import (
    AHLRP,
    AttnLRP,
    Conservative,
    ConstantGate,
    Epsilon,
    Gamma,
    Identity,
    UniformProduct,
)

DTYPE = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


def library_relevance(
    model: nn.Module, preset: lxt_plus.Preset, x: Tensor, g: Tensor
) -> tuple[Tensor, Tensor]:
    """``(R(x), y)`` from the patched ``model``: one backward pass of ``y`` weighted by ``g``."""
    leaf = x.detach().clone().requires_grad_(True)
    with lxt_plus.patched(model, preset):
        y = model(leaf)
        (grad,) = torch.autograd.grad((y * g).sum(), leaf)
    return leaf.detach() * grad, y.detach()


def only(selector: str, rule: lxt_plus.engine.rules.Rule) -> lxt_plus.Preset:
    """Plain Gradient×Input everywhere except ``selector``, which gets ``rule``."""
    return lxt_plus.get_preset("gradient").override(selector, rule)


# --------------------------------------------------------------------------- ε-rule (Bach et al. 2015)
def epsilon_reference(x: Tensor, weight: Tensor, bias: Tensor, r_out: Tensor, eps: float) -> Tensor:
    """LRP-ε on ``z_j = Σ_i x_i w_ij + b_j``: ``R_i = Σ_j x_i w_ij R_j / (z_j + ε·sign z_j)``.

    ``weight`` is ``nn.Linear``'s ``(out, in)`` matrix, so ``w_ij = weight[j, i]``; ``sign 0 = +1``.
    """
    rows, n_in = x.shape
    n_out = weight.shape[0]
    r_in = torch.zeros_like(x)
    for n in range(rows):
        for j in range(n_out):
            z = sum(float(x[n, i]) * float(weight[j, i]) for i in range(n_in)) + float(bias[j])
            denom = z + eps * (1.0 if z >= 0 else -1.0)
            for i in range(n_in):
                r_in[n, i] += float(x[n, i]) * float(weight[j, i]) * float(r_out[n, j]) / denom
    return r_in


@pytest.mark.parametrize("eps", [0.0, 0.05, 1.0])
def test_epsilon_rule_on_linear(eps: float) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).to(DTYPE)
    model = nn.Sequential(layer)
    x = torch.randn(3, 5, dtype=DTYPE)
    g = torch.randn(3, 4, dtype=DTYPE)

    r_lib, y = library_relevance(model, only("linear", Epsilon(eps=eps)), x, g)

    expected = epsilon_reference(x, layer.weight.detach(), layer.bias.detach(), y * g, eps)
    torch.testing.assert_close(r_lib, expected, **TIGHT)
    torch.testing.assert_close(y, layer(x).detach(), rtol=0, atol=0)  # forward value unchanged


def test_epsilon_absorbs_relevance_as_it_grows() -> None:
    """Without bias, ε = 0 is conservative; with ε > 0 the total is ``Σ_j R_j z_j / (z_j + ε sign z_j)``."""
    torch.manual_seed(1)
    layer = nn.Linear(6, 3, bias=False).to(DTYPE)
    model = nn.Sequential(layer)
    x = torch.randn(1, 6, dtype=DTYPE)
    g = torch.ones(1, 3, dtype=DTYPE)
    y = layer(x).detach()
    totals = [
        library_relevance(model, only("linear", Epsilon(eps=e)), x, g)[0].sum().item()
        for e in (0.0, 0.1, 10.0)
    ]
    assert totals[0] == pytest.approx(float((y * g).sum()), rel=1e-12)
    r_out = (y * g)[0]
    for e, total in zip((0.1, 10.0), totals[1:], strict=True):
        z = y[0]
        sign = torch.where(z >= 0, 1.0, -1.0).to(DTYPE)
        expected = float((r_out * z / (z + e * sign)).sum())
        assert total == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- γ-rule (Montavon et al. 2019)
def stabilized(denom: float, eps: float) -> float:
    """``denom + ε·sign(denom)`` with ``sign 0 = +1`` (the γ-rule's stabiliser, ``Gamma.eps``)."""
    return denom + eps * (1.0 if denom >= 0 else -1.0)


def gamma_reference_linear(
    x: Tensor, weight: Tensor, bias: Tensor, r_out: Tensor, gamma: float, eps: float
) -> Tensor:
    """LRP-γ: ``R_i = Σ_j x_i (w_ij + γ w⁺_ij) R_j / (Σ_i' x_i' (w_i'j + γ w⁺_i'j) + b_j + γ b⁺_j)``,
    the denominator stabilised by ``ε·sign``."""
    rows, n_in = x.shape
    n_out = weight.shape[0]

    def wg(j: int, i: int) -> float:
        w = float(weight[j, i])
        return w + gamma * max(w, 0.0)

    r_in = torch.zeros_like(x)
    for n in range(rows):
        for j in range(n_out):
            b = float(bias[j])
            denom = stabilized(
                sum(float(x[n, i]) * wg(j, i) for i in range(n_in)) + b + gamma * max(b, 0.0), eps
            )
            for i in range(n_in):
                r_in[n, i] += float(x[n, i]) * wg(j, i) * float(r_out[n, j]) / denom
    return r_in


def gamma_reference_conv2d(x: Tensor, conv: nn.Conv2d, r_out: Tensor, gamma: float, eps: float) -> Tensor:
    """LRP-γ on a 2-D convolution (stride 1, zero padding ``p``), every receptive field written out.

    Output ``(o, y, x)`` is ``Σ_{c,u,v} in[c, y+u-p, x+v-p] w[o,c,u,v] + b_o``; the γ-rule replaces
    ``w`` by ``w + γ w⁺`` and ``b`` by ``b + γ b⁺`` in both numerator and denominator (stabilised).
    """
    weight, bias = conv.weight.detach(), conv.bias.detach()
    pad = conv.padding[0]
    _, channels, height, width = x.shape
    n_out, _, kh, kw = weight.shape
    wg = weight + gamma * weight.clamp(min=0)
    bg = bias + gamma * bias.clamp(min=0)
    r_in = torch.zeros_like(x)
    out_h, out_w = r_out.shape[-2:]
    for o in range(n_out):
        for oy in range(out_h):
            for ox in range(out_w):
                terms: list[tuple[int, int, int, float]] = []
                for c in range(channels):
                    for u in range(kh):
                        for v in range(kw):
                            iy, ix = oy + u - pad, ox + v - pad
                            if 0 <= iy < height and 0 <= ix < width:
                                terms.append((c, iy, ix, float(x[0, c, iy, ix]) * float(wg[o, c, u, v])))
                denom = stabilized(sum(t[3] for t in terms) + float(bg[o]), eps)
                for c, iy, ix, contribution in terms:
                    r_in[0, c, iy, ix] += contribution * float(r_out[0, o, oy, ox]) / denom
    return r_in


@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0])
def test_gamma_rule_on_linear(gamma: float) -> None:
    torch.manual_seed(2)
    layer = nn.Linear(5, 4).to(DTYPE)
    model = nn.Sequential(layer)
    x = torch.randn(3, 5, dtype=DTYPE)
    g = torch.randn(3, 4, dtype=DTYPE)

    rule = Gamma(
        gamma=gamma, generalized=False
    )  # the original rule; the generalised one: test_linear_rules_reference.py
    r_lib, y = library_relevance(model, only("linear", rule), x, g)

    torch.testing.assert_close(y, layer(x).detach(), rtol=0, atol=0)  # forward value unchanged
    expected = gamma_reference_linear(x, layer.weight.detach(), layer.bias.detach(), y * g, gamma, rule.eps)
    torch.testing.assert_close(r_lib, expected, **TIGHT)


def test_gamma_rule_on_conv2d() -> None:
    torch.manual_seed(3)
    gamma = 0.25
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1).to(DTYPE)
    model = nn.Sequential(conv)
    x = torch.randn(1, 2, 4, 4, dtype=DTYPE)
    g = torch.randn(1, 3, 4, 4, dtype=DTYPE)

    rule = Gamma(
        gamma=gamma, generalized=False
    )  # the original rule; the generalised one: test_linear_rules_reference.py
    r_lib, y = library_relevance(model, only("conv", rule), x, g)

    torch.testing.assert_close(y, conv(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(r_lib, gamma_reference_conv2d(x, conv, y * g, gamma, rule.eps), **TIGHT)


# --------------------------------------------------------------------------- identity rule
@pytest.mark.parametrize(
    "act",
    [nn.GELU(), nn.SiLU(), nn.Tanh(), nn.ReLU(), ACT2FN["silu"]],
    ids=["gelu", "silu", "tanh", "relu", "hf-silu"],
)
def test_identity_rule_on_activation_modules(act: nn.Module) -> None:
    """Identity rule (Achtibat et al. 2024, Sec. 3.3.2): ``R(x_i) = R(y_i)`` element-wise.

    SiLU and ReLU take a closed-form ``f(x)/x``; the others the generic stabilised ratio.
    """
    torch.manual_seed(4)
    model = nn.Sequential(act)
    x = torch.randn(2, 7, dtype=DTYPE)
    x[0, 0] = 0.0  # the closed forms and the stabiliser must agree at zero too
    g = torch.randn(2, 7, dtype=DTYPE)

    r_lib, y = library_relevance(model, only("activation", Identity()), x, g)

    torch.testing.assert_close(y, act(x), rtol=0, atol=0)
    torch.testing.assert_close(r_lib, y * g, **TIGHT)
    # and plain Gradient×Input is not the identity rule (the check is not vacuous); for ReLU,
    # positively homogeneous, the two coincide
    r_grad, _ = library_relevance(model, lxt_plus.get_preset("gradient"), x, g)
    assert torch.allclose(r_grad, y * g, rtol=1e-3) == isinstance(act, nn.ReLU)


# --------------------------------------------------------------------------- conservative norms (Ali et al. 2022)
def layer_norm_matrix(x_row: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``M`` with ``y_k = Σ_i x_i M_ik + b_k`` when ``σ`` is held constant: ``M = C·diag(w)/σ``,
    where ``C = I - 11ᵀ/d`` is the centering matrix and ``σ = sqrt(var(x) + eps)`` (biased var)."""
    d = x_row.shape[0]
    centering = torch.eye(d, dtype=DTYPE) - torch.full((d, d), 1.0 / d, dtype=DTYPE)
    mean = sum(float(v) for v in x_row) / d
    sigma = math.sqrt(sum((float(v) - mean) ** 2 for v in x_row) / d + eps)
    return centering @ torch.diag(weight) / sigma


def rms_norm_matrix(x_row: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``M = diag(w)/rms`` with ``rms = sqrt(mean(x²) + eps)`` held constant."""
    d = x_row.shape[0]
    rms = math.sqrt(sum(float(v) ** 2 for v in x_row) / d + eps)
    return torch.diag(weight) / rms


def linear_map_relevance(x_row: Tensor, matrix: Tensor, y_row: Tensor, r_row: Tensor) -> Tensor:
    """LRP-0 through ``y = x M + b`` (bias absorbs): ``R(x_i) = Σ_k x_i M_ik R_k / y_k`` (loops)."""
    d_in, d_out = matrix.shape
    out = torch.zeros(d_in, dtype=DTYPE)
    for i in range(d_in):
        out[i] = sum(
            float(x_row[i]) * float(matrix[i, k]) * float(r_row[k]) / float(y_row[k]) for k in range(d_out)
        )
    return out


NORM_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


@pytest.mark.parametrize("kind", ["layer-norm", "rms-norm"])
def test_norm_rule_keeps_float64_in_float64(kind: str) -> None:
    """The conservative norm rule computes a float64 norm in float64: the patched forward equals the
    unpatched module to 1e-12 (a float32 round trip, ``x.float()``, is off by ~1e-7)."""
    torch.manual_seed(4)
    norm = (nn.LayerNorm(8) if kind == "layer-norm" else nn.RMSNorm(8, eps=1e-6)).to(DTYPE)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn(p.shape, dtype=DTYPE))
    model = nn.Sequential(norm)
    x = (torch.linspace(-1.0, 2.0, 16, dtype=DTYPE).reshape(2, 8).pow(3) + 1e-3).requires_grad_(True)
    expected = model(x).detach()
    with lxt_plus.patched(model, only("norm", Conservative())):
        y = model(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
    assert y.dtype == DTYPE and grad.dtype == DTYPE
    torch.testing.assert_close(y.detach(), expected, rtol=0.0, atol=1e-12)


def norm_tolerance(dtype: torch.dtype) -> dict[str, float]:
    return TIGHT if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)


def check_norm_rule(
    norm: nn.Module, matrix_of: Callable[[Tensor], Tensor], bias: Tensor | None, dtype: torch.dtype, seed: int
) -> None:
    """Library relevance through ``norm`` against LRP-0 through its σ-constant linear map.

    The reference runs in float64 on the same (possibly float32) inputs: ``y = x M + b`` with
    ``M = matrix_of(x)``, ``R(y) = y·g``, ``R(x_i) = Σ_k x_i M_ik R(y_k) / y_k``.
    """
    torch.manual_seed(seed)
    d = 6
    model = nn.Sequential(norm).to(dtype)
    x = torch.randn(3, d, dtype=DTYPE).to(dtype)
    g = torch.randn(3, d, dtype=DTYPE).to(dtype)

    r_lib, y_lib = library_relevance(model, only("norm", Conservative()), x, g)

    tol = norm_tolerance(dtype)
    torch.testing.assert_close(y_lib, norm(x).detach(), **tol)  # forward value unchanged
    for n in range(x.shape[0]):
        x_row, g_row = x[n].double(), g[n].double()
        matrix = matrix_of(x_row)
        y_row = x_row @ matrix + (0.0 if bias is None else bias.double())
        r_out = y_row * g_row
        expected = linear_map_relevance(x_row, matrix, y_row, r_out)
        torch.testing.assert_close(r_lib[n].double(), expected, **tol)
        if bias is None:  # Σ_i R(x_i) = Σ_k R(y_k): the centred, rescaled map is conservative
            torch.testing.assert_close(r_lib[n].double().sum(), r_out.sum(), **tol)


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_conservative_layer_norm(with_bias: bool, dtype: torch.dtype) -> None:
    """Ali et al. 2022: ``y = (x - μ)/σ · w + b`` with ``σ`` held constant is the linear map
    ``M = C·diag(w)/σ`` (centering matrix ``C``); LRP-0 through it is conservative when ``b = 0``."""
    torch.manual_seed(5)
    norm = nn.LayerNorm(6, eps=1e-5, bias=with_bias).to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, dtype=DTYPE))
        if with_bias:
            norm.bias.copy_(torch.randn(6, dtype=DTYPE))
    weight = norm.weight.detach().to(dtype).double()
    bias = norm.bias.detach().to(dtype) if with_bias else None
    check_norm_rule(norm, lambda x_row: layer_norm_matrix(x_row, weight, norm.eps), bias, dtype, seed=50)


@pytest.mark.parametrize("dtype", NORM_DTYPES)
def test_conservative_rms_norm(dtype: torch.dtype) -> None:
    """RMSNorm with the RMS held constant is ``diag(w)/rms``: ``R(x_k) = R(y_k)`` exactly."""
    torch.manual_seed(6)
    norm = nn.RMSNorm(6, eps=1e-6).to(DTYPE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, dtype=DTYPE))
    weight = norm.weight.detach().to(dtype).double()
    check_norm_rule(norm, lambda x_row: rms_norm_matrix(x_row, weight, 1e-6), None, dtype, seed=60)


# --------------------------------------------------------------------------- uniform rule on a gated product
class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: the SwiGLU block of Llama-style models, without biases."""

    def __init__(self, d: int = 5, hidden: int = 7) -> None:
        super().__init__()
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


def _gated_messages(
    x: Tensor, g: Tensor, weights: tuple[Tensor, Tensor, Tensor], shift: float
) -> tuple[list[float], list[float], list[float], list[float], list[float]]:
    """One row through ``down((up(x) + shift) · silu(gate(x)))`` in plain floats, with LRP-0's
    message into the product from the output relevance ``out · g``: ``(gate, up, act, prod, R(prod))``."""
    wg, wu, wd = weights
    gate = [sum(float(x[i]) * float(wg[k, i]) for i in range(5)) for k in range(7)]
    up = [sum(float(x[i]) * float(wu[k, i]) for i in range(5)) for k in range(7)]
    act = [v / (1.0 + math.exp(-v)) for v in gate]
    prod = [(u + shift) * a for a, u in zip(act, up, strict=True)]
    out = [sum(prod[k] * float(wd[j, k]) for k in range(7)) for j in range(5)]
    r_out = [out[j] * float(g[j]) for j in range(5)]
    r_prod = [sum(prod[k] * float(wd[j, k]) * r_out[j] / out[j] for j in range(5)) for k in range(7)]
    return gate, up, act, prod, r_prod


def test_uniform_rule_on_gated_product() -> None:
    """Uniform rule (Achtibat et al. 2024, Prop. 3.3): ``R(a) = R(u) = R(a·u)/2``; with LRP-0 on the
    projections and the identity rule on the activation the block conserves relevance."""
    torch.manual_seed(7)
    mlp = GatedMLP().to(DTYPE)
    preset = only("activation", Identity()).override("mlp", UniformProduct())
    x = torch.randn(2, 5, dtype=DTYPE)
    g = torch.randn(2, 5, dtype=DTYPE)

    seen: dict[str, Tensor] = {}

    def keep(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            out.retain_grad()
            seen[name] = out

        return hook

    def keep_input(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        args[0].retain_grad()
        seen["product"] = args[0]

    handles = [
        mlp.act.register_forward_hook(keep("act")),
        mlp.up.register_forward_hook(keep("up")),
        mlp.down.register_forward_pre_hook(keep_input),
    ]
    try:
        r_lib, y = library_relevance(mlp, preset, x, g)
    finally:
        for h in handles:
            h.remove()

    def rel(name: str) -> Tensor:
        t = seen[name]
        assert t.grad is not None
        return t.detach() * t.grad

    # Explicit reference: every step's relevance message written out.
    wg, wu, wd = (m.weight.detach() for m in (mlp.gate, mlp.up, mlp.down))
    r_in = torch.zeros_like(x)
    for n in range(x.shape[0]):
        gate, up, act, prod, r_prod = _gated_messages(x[n], g[n], (wg, wu, wd), 0.0)
        r_act = [0.5 * r for r in r_prod]  # uniform rule: half to each factor
        r_up = [0.5 * r for r in r_prod]
        r_gate = r_act  # identity rule through SiLU
        for i in range(5):
            r_in[n, i] = sum(
                float(x[n, i]) * float(wg[k, i]) * r_gate[k] / gate[k]
                + float(x[n, i]) * float(wu[k, i]) * r_up[k] / up[k]
                for k in range(7)
            )
        torch.testing.assert_close(rel("product")[n], torch.tensor(r_prod, dtype=DTYPE), **TIGHT)
        torch.testing.assert_close(rel("act")[n], torch.tensor(r_act, dtype=DTYPE), **TIGHT)
        torch.testing.assert_close(rel("up")[n], torch.tensor(r_up, dtype=DTYPE), **TIGHT)

    torch.testing.assert_close(r_lib, r_in, **TIGHT)
    torch.testing.assert_close(r_lib.sum(-1), (y * g).sum(-1), **TIGHT)  # conserved end to end


class ShiftedGatedMLP(GatedMLP):
    """``down((up(x) + 1) · act(gate(x)))``: GPT-OSS's and MiniMax-M3's SwiGLU, without clamps."""

    def forward(self, x: Tensor) -> Tensor:
        return self.down((self.up(x) + 1) * self.act(self.gate(x)))


@pytest.mark.parametrize("constant_gate", [False, True], ids=["uniform", "constant-gate"])
def test_product_with_a_shifted_factor(constant_gate: bool) -> None:
    """``(u + c)·a = u·a + c·a``: the ε-rule on that sum gives ``u·a`` its share, split by the
    product rule, and ``c·a`` to ``a``, not to the constant. Uniform: ``R(u) = R·(u·a/2)/y``,
    ``R(a) = R·(u·a/2 + c·a)/y``; with the gate held constant (CP-LRP): ``R(u) = R·u·a/y``,
    ``R(a) = R·c·a/y``. Either way the block conserves with ``c`` on the path."""
    torch.manual_seed(8)
    mlp = ShiftedGatedMLP().to(DTYPE)
    preset = only("activation", Identity()).override(
        "mlp", ConstantGate() if constant_gate else UniformProduct()
    )
    x = torch.randn(3, 5, dtype=DTYPE)
    g = torch.randn(3, 5, dtype=DTYPE)
    r_lib, y = library_relevance(mlp, preset, x, g)

    wg, wu, wd = (m.weight.detach() for m in (mlp.gate, mlp.up, mlp.down))
    r_in = torch.zeros_like(x)
    for n in range(x.shape[0]):
        gate, up, act, prod, r_prod = _gated_messages(x[n], g[n], (wg, wu, wd), 1.0)
        share = 1.0 if constant_gate else 0.5  # of u·a's relevance that goes to u
        r_up = [r_prod[k] * share * up[k] * act[k] / prod[k] for k in range(7)]
        r_act = [r_prod[k] * ((1 - share) * up[k] * act[k] + act[k]) / prod[k] for k in range(7)]
        for i in range(5):
            r_in[n, i] = sum(
                float(x[n, i]) * float(wg[k, i]) * r_act[k] / gate[k]  # identity rule through SiLU
                + float(x[n, i]) * float(wu[k, i]) * r_up[k] / up[k]
                for k in range(7)
            )
    torch.testing.assert_close(r_lib, r_in, **TIGHT)
    torch.testing.assert_close(r_lib.sum(-1), (y * g).sum(-1), **TIGHT)


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "dtype_a", "dtype_b"),
    [
        ((3, 4), (3, 4), torch.float64, torch.float64),
        (
            (3, 1),
            (3, 4),
            torch.float64,
            torch.float64,
        ),  # MoE: a router weight per token times an expert output
        ((4,), (2, 3, 4), torch.float32, torch.float32),
        ((3, 1), (3, 4), torch.float32, torch.bfloat16),  # float32 router weights, bf16 experts
    ],
)
def test_uniform_product_is_half_the_product_rule(shape_a, shape_b, dtype_a, dtype_b) -> None:  # type: ignore[no-untyped-def]
    """Each factor gets half of what the product rule gives it, reduced over broadcast dimensions
    and in its own dtype, and the forward value is the plain product bit for bit."""
    from lxt_plus.engine.functional import uniform_mul

    torch.manual_seed(3)
    a = torch.randn(shape_a, dtype=dtype_a, requires_grad=True)
    b = torch.randn(shape_b, dtype=dtype_b, requires_grad=True)
    out = uniform_mul(a, b)
    plain = a * b
    assert torch.equal(out, plain) and out.dtype == plain.dtype
    g = torch.randn_like(plain)
    got = torch.autograd.grad(out, (a, b), g)
    want = torch.autograd.grad(plain, (a, b), g)
    for x, w, t in zip(got, want, (a, b), strict=True):
        assert x.shape == t.shape and x.dtype == t.dtype
        torch.testing.assert_close(x, 0.5 * w)
    # only the factor that needs a gradient gets one
    c = torch.randn(shape_b, dtype=dtype_b)
    (only,) = torch.autograd.grad(uniform_mul(a, c), (a,), torch.ones_like(plain))
    torch.testing.assert_close(only, 0.5 * torch.autograd.grad((a * c).sum(), a)[0])


# --------------------------------------------------------------------------- softmax and attention (AttnLRP)
def softmax_rule_reference(x: Tensor, s: Tensor, r_out: Tensor) -> Tensor:
    """AttnLRP softmax rule (Achtibat et al. 2024, Prop. 3.1): ``R_i = x_i (R_i^out - s_i Σ_j R_j^out)``."""
    rows, k = x.shape
    out = torch.zeros_like(x)
    for n in range(rows):
        total = sum(float(r_out[n, j]) for j in range(k))
        for i in range(k):
            out[n, i] = float(x[n, i]) * (float(r_out[n, i]) - float(s[n, i]) * total)
    return out


@pytest.mark.parametrize("preset", ["attnlrp", "ah-lrp"])
def test_softmax_rule(preset: str) -> None:
    """A standalone softmax keeps its gradient in every LRP preset: the softmax rule."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Softmax(dim=-1))
    x = torch.randn(3, 6, dtype=DTYPE)
    g = torch.randn(3, 6, dtype=DTYPE)

    r_lib, s = library_relevance(model, lxt_plus.get_preset(preset), x, g)

    torch.testing.assert_close(r_lib, softmax_rule_reference(x, s, s * g), **TIGHT)


class TinySelfAttention(nn.Module):
    """One head of self-attention written inline (no transformers registry): the ``ops`` route."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.scale = d**-0.5

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return weights @ v


def attention_reference(model: TinySelfAttention, x: Tensor, r_out: Tensor, rule: str) -> Tensor:
    """Relevance of ``x`` through ``softmax(q kᵀ·scale) v``, every message written out with loops.

    - ``ah-lrp`` (Ali et al. 2022): ``A`` is constant, ``R(v_jd) = Σ_i A_ij v_jd R(o_id) / o_id``.
    - ``attnlrp`` (Achtibat et al. 2024): on ``o_id = Σ_j A_ij v_jd`` each product ``A_ij v_jd`` gets
      ``A_ij v_jd R(o_id)/o_id``, half to ``A_ij`` and half to ``v_jd`` (uniform rule); the softmax rule
      gives ``R(s_ij) = s_ij (R(A_ij) - A_ij Σ_j' R(A_ij'))``; on ``s_ij = scale Σ_d q_id k_jd`` each product
      ``q_id k_jd`` gets ``q_id k_jd R(s_ij) / (q_i·k_j)``, half to ``q_id`` and half to ``k_jd``.
    - Then LRP-0 through the three projections, summed at ``x``.
    """
    n, d = x.shape
    wq, wk, wv = (m.weight.detach() for m in (model.q, model.k, model.v))
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    dot = [[sum(float(q[i, e]) * float(k[j, e]) for e in range(d)) for j in range(n)] for i in range(n)]
    scores = [[model.scale * dot[i][j] for j in range(n)] for i in range(n)]
    att = []
    for i in range(n):
        m = max(scores[i])
        ex = [math.exp(s - m) for s in scores[i]]
        att.append([e / sum(ex) for e in ex])
    o = [[sum(att[i][j] * float(v[j, e]) for j in range(n)) for e in range(d)] for i in range(n)]
    r_q, r_k, r_v = (torch.zeros(n, d, dtype=DTYPE) for _ in range(3))
    r_att = [[0.0] * n for _ in range(n)]
    share = 1.0 if rule == "ah-lrp" else 0.5
    for i in range(n):
        for e in range(d):
            for j in range(n):
                r_prod = att[i][j] * float(v[j, e]) * float(r_out[i, e]) / o[i][e]
                r_v[j, e] += share * r_prod
                r_att[i][j] += (1.0 - share) * r_prod
    if rule == "attnlrp":
        for i in range(n):
            total = sum(r_att[i])
            for j in range(n):
                r_score = scores[i][j] * (r_att[i][j] - att[i][j] * total)
                for e in range(d):
                    r_prod = float(q[i, e]) * float(k[j, e]) * r_score / dot[i][j]
                    r_q[i, e] += 0.5 * r_prod
                    r_k[j, e] += 0.5 * r_prod
    r_x = torch.zeros(n, d, dtype=DTYPE)
    for proj, w, r in ((q, wq, r_q), (k, wk, r_k), (v, wv, r_v)):
        for t in range(n):
            for i in range(d):
                r_x[t, i] += sum(
                    float(x[t, i]) * float(w[e, i]) * float(r[t, e]) / float(proj[t, e]) for e in range(d)
                )
    return r_x


@pytest.mark.parametrize("rule", ["attnlrp", "ah-lrp"])
def test_inline_attention_rules(rule: str) -> None:
    torch.manual_seed(9)
    attn = TinySelfAttention().to(DTYPE)
    preset = only("attention", AttnLRP() if rule == "attnlrp" else AHLRP())
    x = torch.randn(3, 4, dtype=DTYPE)
    g = torch.randn(3, 4, dtype=DTYPE)

    r_lib, y = library_relevance(attn, preset, x, g)

    torch.testing.assert_close(y, attn(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(r_lib, attention_reference(attn, x, y * g, rule), **TIGHT)
    if rule == "ah-lrp":  # no bias anywhere and constant attention weights: conserved
        torch.testing.assert_close(r_lib.sum(), (y * g).sum(), **TIGHT)
