"""The rules that modify a linear map, against slow references written from their papers' formulas.

Each reference loops over inputs ``i`` and outputs ``j`` of ``z_j = Σ_i x_i w_ij + b_j`` in float64
and uses no autograd. ``R_j = z_j g_j`` is the output relevance that one backward pass of ``y·g``
gives; stabilised denominators are ``d + ε·sign d`` with ``sign 0 = +1``. zennit's implementations
of the same rules are compared in ``test_zennit_parity.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import lxt_plus
from lxt_plus.engine import rules as R

DTYPE = torch.float64
EPS = 1e-6


def pos(v: float) -> float:
    return max(v, 0.0)


def neg(v: float) -> float:
    return min(v, 0.0)


def stab(d: float, eps: float = EPS) -> float:
    return d + (eps if d >= 0 else -eps)


# A rule as (numerator terms, denominator): share_ij for output j, given x_i, w_ij, b_j, z_j.
Share = Callable[[list[float], list[float], float, float], list[float]]


def reference(x: Tensor, layer: nn.Linear, g: Tensor, share: Share) -> Tensor:
    """``R_i = Σ_j share_ij(x, w_·j, b_j, z_j) · R_j``, ``R_j = z_j g_j``."""
    w, b = layer.weight.detach(), layer.bias.detach()
    r_in = torch.zeros_like(x)
    for n in range(x.shape[0]):
        xs = [float(v) for v in x[n]]
        for j in range(w.shape[0]):
            ws = [float(v) for v in w[j]]
            z = sum(xi * wi for xi, wi in zip(xs, ws, strict=True)) + float(b[j])
            r_j = z * float(g[n, j])
            for i, s in enumerate(share(xs, ws, float(b[j]), z)):
                r_in[n, i] += s * r_j
    return r_in


def gamma_share(gamma: float) -> Share:
    """Generalised γ (Andéol et al. 2021, as zennit implements it): for ``z_j > 0`` the pairs
    ``x⁺(w + γw⁺)``, ``x⁻(w + γw⁻)`` with bias ``b + γb⁺``; for ``z_j < 0`` the mirrored pairs
    ``x⁺(w + γw⁻)``, ``x⁻(w + γw⁺)`` with bias ``b + γb⁻``; ``z_j = 0`` passes nothing."""

    def share(xs: list[float], ws: list[float], b: float, z: float) -> list[float]:
        if z == 0:
            return [0.0] * len(xs)
        up = (lambda w: w + gamma * pos(w)) if z > 0 else (lambda w: w + gamma * neg(w))
        down = (lambda w: w + gamma * neg(w)) if z > 0 else (lambda w: w + gamma * pos(w))
        num = [pos(xi) * up(wi) + neg(xi) * down(wi) for xi, wi in zip(xs, ws, strict=True)]
        bias = b + gamma * (pos(b) if z > 0 else neg(b))
        d = stab(sum(num) + bias)
        return [v / d for v in num]

    return share


def alpha_beta_share(alpha: float, beta: float) -> Share:
    """αβ (Bach et al. 2015): ``α·(x⁺w⁺ + x⁻w⁻)/Σ(… + b⁺) − β·(x⁺w⁻ + x⁻w⁺)/Σ(… + b⁻)``."""

    def share(xs: list[float], ws: list[float], b: float, z: float) -> list[float]:
        p = [pos(xi) * pos(wi) + neg(xi) * neg(wi) for xi, wi in zip(xs, ws, strict=True)]
        q = [pos(xi) * neg(wi) + neg(xi) * pos(wi) for xi, wi in zip(xs, ws, strict=True)]
        dp, dq = stab(sum(p) + pos(b)), stab(sum(q) + neg(b))
        return [alpha * a / dp - beta * c / dq for a, c in zip(p, q, strict=True)]

    return share


def zbox_share(low: float, high: float) -> Share:
    """z^B (Montavon et al. 2017): ``(x w − l w⁺ − h w⁻) / Σ_i (x w − l w⁺ − h w⁻)``."""

    def share(xs: list[float], ws: list[float], b: float, z: float) -> list[float]:
        num = [xi * wi - low * pos(wi) - high * neg(wi) for xi, wi in zip(xs, ws, strict=True)]
        d = stab(sum(num))
        return [v / d for v in num]

    return share


def flat_share(xs: list[float], ws: list[float], b: float, z: float) -> list[float]:
    """Flat (Lapuschkin et al. 2019): every input of the receptive field gets an equal share."""
    return [1.0 / stab(float(len(xs)))] * len(xs)


def wsquare_share(xs: list[float], ws: list[float], b: float, z: float) -> list[float]:
    """w² (Montavon et al. 2017): ``w² / (Σ w² + b²)`` (zennit squares the bias as well)."""
    d = stab(sum(wi * wi for wi in ws) + b * b)
    return [wi * wi / d for wi in ws]


CASES = {
    "gamma-0.25": (R.Gamma(gamma=0.25), gamma_share(0.25)),
    "gamma-1": (R.Gamma(gamma=1.0), gamma_share(1.0)),
    "zplus": (R.ZPlus(), alpha_beta_share(1.0, 0.0)),
    "alpha2-beta1": (R.AlphaBeta(alpha=2.0, beta=1.0), alpha_beta_share(2.0, 1.0)),
    "alpha1-beta0": (R.AlphaBeta(alpha=1.0, beta=0.0), alpha_beta_share(1.0, 0.0)),
    "zbox": (R.ZBox(low=-2.5, high=3.0), zbox_share(-2.5, 3.0)),
    "flat": (R.Flat(), flat_share),
    "wsquare": (R.WSquare(), wsquare_share),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_linear_rule_equals_its_reference(name: str) -> None:
    rule, share = CASES[name]
    torch.manual_seed(5)
    layer = nn.Linear(5, 4).to(DTYPE)
    x = torch.randn(3, 5, dtype=DTYPE)  # signed inputs
    x[0, 1] = 0.0
    g = torch.randn(3, 4, dtype=DTYPE)
    z = layer(x).detach()
    assert (z > 0).any() and (z < 0).any()  # both output signs occur

    model = nn.Sequential(layer)
    got, corrections = explained(model, x, g, rule)
    torch.testing.assert_close(got, reference(x, layer, g, share), rtol=1e-10, atol=1e-12)
    # rules whose inputs are x, x⁺ or x⁻ are exact as x * grad; constant input terms need the correction
    assert bool(corrections) == (name in ("zbox", "flat", "wsquare"))


def explained(model: nn.Module, x: Tensor, g: Tensor, rule: R.Rule) -> tuple[Tensor, list[Tensor]]:
    """Relevance for the upstream ``g`` as explain computes it: ``x * grad`` plus the exact-input
    corrections, and the corrections themselves."""
    leaf = x.clone().requires_grad_(True)
    with lxt_plus.patched(model, lxt_plus.get_preset("gradient").override("linear", rule)):
        with lxt_plus.engine.functional.input_relevance() as exact:
            y = model(leaf)
        torch.testing.assert_close(y.detach(), model(x).detach(), rtol=0, atol=0)  # exact forward value
        (grad,) = torch.autograd.grad((y * g).sum(), leaf)
    corrections = exact.get(id(leaf), [])
    return leaf.detach() * grad + sum(corrections), corrections


def test_rules_refuse_modules_that_are_not_linear_maps() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval()
    preset = lxt_plus.get_preset("gradient").override("linear", R.Gamma())
    with pytest.raises(lxt_plus.errors.UnsupportedModelError, match=r"gamma.*BatchNorm1d.*type:BatchNorm1d"):
        lxt_plus.patch(model, preset)
    assert "forward" not in model[0].__dict__  # rolled back


@pytest.mark.parametrize(
    ("spec", "rule"),
    [
        ({"gamma": {"gamma": 0.5, "generalized": False}}, R.Gamma(gamma=0.5, generalized=False)),
        ("zplus", R.ZPlus()),
        ({"alpha-beta": {"alpha": 1, "beta": 0}}, R.AlphaBeta(alpha=1.0, beta=0.0)),
        ({"zbox": {"low": [-1, -2], "high": 3}}, R.ZBox(low=(-1.0, -2.0), high=3.0)),
        ("flat", R.Flat()),
        ("wsquare", R.WSquare()),
    ],
)
def test_rules_by_name(spec: object, rule: R.Rule) -> None:
    assert R.rule_from_spec(spec) == rule


def test_bad_rule_parameters_are_config_errors() -> None:
    with pytest.raises(lxt_plus.errors.ConfigError, match="alpha - beta = 1"):
        R.rule_from_spec({"alpha-beta": {"alpha": 2, "beta": 2}})
    with pytest.raises(lxt_plus.errors.ConfigError, match="'generalized' of rule 'gamma' is true or false"):
        R.rule_from_spec({"gamma": {"generalized": "yes"}})


class _FourTermGamma(R.Gamma):
    """The generalised γ through the generic four-term path, as zennit writes it."""

    def terms(self) -> tuple[object, ...]:  # type: ignore[override]
        return self.generalized_terms()


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(6, 5),
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        lambda: nn.Conv1d(3, 4, 3, dilation=2),
    ],
    ids=["linear-seq", "conv2d-grouped", "conv1d-dilated"],
)
def test_generalised_gamma_closed_form_equals_its_four_terms(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(7)
    layer = make().to(DTYPE)
    shape = {nn.Linear: (2, 3, 6), nn.Conv2d: (2, 4, 5, 5), nn.Conv1d: (2, 3, 9)}[type(layer)]
    x = torch.randn(shape, dtype=DTYPE)
    x.view(-1)[::7] = 0.0
    g = torch.randn_like(layer(x))
    for gamma in (0.25, 1.0):
        a, _ = explained(nn.Sequential(layer), x, g, R.Gamma(gamma=gamma))
        b, _ = explained(nn.Sequential(layer), x, g, _FourTermGamma(gamma=gamma))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))
