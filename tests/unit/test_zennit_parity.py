"""Our ε, γ, z⁺, αβ, z^B, flat and w² rules against zennit's, in float64.

zennit is the reference library that defines these rules; where lxt_plus uses the same name it
must give the same numbers. Models are plain MLPs and CNNs with signed inputs, and every output
is explained, so both signs of the target logit occur. zennit is seeded with ``R = logit`` at the
output (``attr_output = output * onehot``), which is what one backward pass from the logit gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lxt_plus
from lxt_plus.engine import rules as R

sys.path.insert(0, str(Path(__file__).parents[1]))
from zennit_reference import import_zennit  # noqa: E402

zennit = import_zennit()
from zennit.attribution import Gradient  # noqa: E402
from zennit.composites import NameMapComposite  # noqa: E402
from zennit.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus  # noqa: E402

DTYPE = torch.float64
RTOL = 1e-10

# (our rule, zennit's rule) on every layer
EVERY_LAYER = {
    "epsilon": (R.Epsilon(eps=1e-6), Epsilon(epsilon=1e-6)),
    "epsilon-0.25": (R.Epsilon(eps=0.25), Epsilon(epsilon=0.25)),
    "gamma": (R.Gamma(), Gamma()),
    "gamma-1": (R.Gamma(gamma=1.0), Gamma(gamma=1.0)),
    "gamma-eps": (R.Gamma(gamma=0.1, eps=1e-3), Gamma(gamma=0.1, stabilizer=1e-3)),
    "zplus": (R.ZPlus(), ZPlus()),
    "alpha2-beta1": (R.AlphaBeta(alpha=2.0, beta=1.0), AlphaBeta(alpha=2.0, beta=1.0)),
    "alpha1-beta0": (R.AlphaBeta(alpha=1.0, beta=0.0), AlphaBeta(alpha=1.0, beta=0.0)),
}
# (our rule, zennit's rule) on the input layer, with ε on the layers above
INPUT_LAYER = {
    "zbox": (R.ZBox(low=-3.0, high=3.0), ZBox(low=-3.0, high=3.0)),
    "flat": (R.Flat(), Flat()),
    "wsquare": (R.WSquare(), WSquare()),
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 4)).to(DTYPE)


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    ).to(DTYPE)


def inputs(model: nn.Module) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    shape = (5, 6) if isinstance(model[0], nn.Linear) else (5, 2, 6, 6)
    x = torch.randn(shape, generator=gen, dtype=DTYPE)
    x.view(5, -1)[:, 0] = 0.0  # an input of exactly 0: rules with constant input terms give it relevance
    return x


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def ours(model: nn.Module, x: Tensor, target: int, rule: R.Rule, first: R.Rule | None = None) -> Tensor:
    preset = lxt_plus.get_preset("gradient").override("linear", rule).override("conv", rule)
    if first is not None:
        preset = preset.override(f"name:{layer_names(model)[0]}", first)
    return lxt_plus.explain(model, x, target=target, rules=preset).batch_relevance


def theirs(model: nn.Module, x: Tensor, target: int, rule: object, first: object | None = None) -> Tensor:
    names = layer_names(model)
    mapping = [(names, rule)] if first is None else [(names[:1], first), (names[1:], rule)]
    with Gradient(model, NameMapComposite(mapping)) as attributor:
        onehot = torch.eye(model(x[:1]).shape[-1], dtype=DTYPE)[[target]]
        _, relevance = attributor(x.clone().requires_grad_(True), lambda out: out * onehot)
    return relevance.detach()


def assert_same(a: Tensor, b: Tensor) -> None:
    assert b.abs().max() > 1e-3, "a vacuous comparison: zennit's relevance is all zero"
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(EVERY_LAYER))
def test_rule_on_every_layer_equals_zennit(make, name: str) -> None:  # type: ignore[no-untyped-def]
    model, (rule, zrule) = make(), EVERY_LAYER[name]
    x = inputs(model)
    logits = model(x)
    signs = set()
    for target in range(logits.shape[-1]):
        a, b = ours(model, x, target, rule), theirs(model, x, target, zrule)
        if b.abs().max() <= 1e-3:  # e.g. z⁺ where every active weight into this output is negative
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
            continue
        assert_same(a, b)
        signs |= set(torch.sign(logits[:, target]).tolist())
    assert signs == {-1.0, 1.0}  # both signs of the target logit were compared


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(INPUT_LAYER))
def test_input_layer_rule_equals_zennit(make, name: str) -> None:  # type: ignore[no-untyped-def]
    model, (rule, zrule) = make(), INPUT_LAYER[name]
    x = inputs(model)
    for target in (0, 3):
        a = ours(model, x, target, R.Epsilon(eps=1e-6), first=rule)
        b = theirs(model, x, target, Epsilon(epsilon=1e-6), first=zrule)
        assert_same(a, b)
        assert (b.reshape(5, -1)[:, 0] != 0).any()  # the zero inputs do carry relevance here


def test_zbox_per_channel_bounds_equal_zennit() -> None:
    model = cnn()
    x = inputs(model)
    low, high = (-2.0, -1.5), (2.5, 3.0)
    a = ours(model, x, 1, R.Epsilon(eps=1e-6), first=R.ZBox(low=low, high=high))
    zlow = torch.tensor(low, dtype=DTYPE).view(1, 2, 1, 1)
    zhigh = torch.tensor(high, dtype=DTYPE).view(1, 2, 1, 1)
    b = theirs(model, x, 1, Epsilon(epsilon=1e-6), first=ZBox(low=zlow, high=zhigh))
    assert_same(a, b)


def test_original_gamma_differs_from_the_generalised_rule_with_signed_inputs() -> None:
    """The original rule (``generalized=False``) is kept as an option; it is a different rule."""
    model = mlp()
    x = inputs(model)
    generalised = ours(model, x, 0, R.Gamma())
    original = ours(model, x, 0, R.Gamma(generalized=False))
    assert not torch.allclose(generalised, original, rtol=1e-3)
    # with non-negative inputs and a positive output the two agree on a single layer
    torch.manual_seed(3)
    layer = nn.Sequential(nn.Linear(6, 3)).to(DTYPE)
    xp = x.abs()
    with torch.no_grad():
        layer[0].bias.abs_()  # signed weights, but a positive output to explain
    target = int(layer(xp)[0].argmax())
    assert layer(xp)[0, target] > 0 and (layer[0].weight < 0).any()
    a = ours(layer, xp[:1], target, R.Gamma())
    b = ours(layer, xp[:1], target, R.Gamma(generalized=False))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", sorted(INPUT_LAYER))
def test_input_layer_rule_behind_a_flatten_equals_zennit(name: str) -> None:
    """An image MLP starts with ``nn.Flatten``: the first Linear sees a view of the explained input,
    and its zero pixels (a black row) still get their relevance."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).to(DTYPE)
    x = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    x[:, 0] = 0.0
    rule, zrule = INPUT_LAYER[name]
    preset = lxt_plus.get_preset("gradient").override("linear", R.Epsilon(eps=1e-6)).override("name:1", rule)
    a = lxt_plus.explain(model, x, target=1, rules=preset).batch_relevance
    with Gradient(model, NameMapComposite([(["1"], zrule), (["3"], Epsilon(epsilon=1e-6))])) as attributor:
        _, b = attributor(x.clone().requires_grad_(True), lambda out: out * torch.eye(3, dtype=DTYPE)[[1]])
    assert_same(a, b.detach())
    assert (b[:, 0] != 0).any()


def test_constant_input_rule_on_a_computed_input_warns() -> None:
    """In a middle layer the relevance of zero-valued inputs cannot be carried: say so."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(DTYPE)
    preset = lxt_plus.get_preset("gradient").override("name:2", R.Flat())
    with pytest.warns(RuntimeWarning, match="relevance of\\s+its zero inputs is lost"):
        lxt_plus.explain(model, inputs(mlp()), target=1, rules=preset)
