"""The operation-level completeness check: what it accepts as linear, what it refuses by name."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, "tests")
import families as F  # noqa: E402

import lxt_plus  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402
from lxt_plus.errors import LxtPlusWarning, UnsupportedModelError  # noqa: E402

IDS = torch.tensor([[5, 9, 13, 17, 21]])


class Op(nn.Module):
    """A custom leaf module of no known role, computing ``fn(x)``."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn
        self.scale = nn.Parameter(torch.full((32,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


LINEAR = {
    "scale by a parameter": lambda m, x: x * m.scale,
    "cumsum": lambda m, x: x.cumsum(-1) / 32,
    "concat and slice": lambda m, x: torch.cat([x, x], -1)[..., :32],
    "mean": lambda m, x: x - x.mean(-1, keepdim=True),
    "divide by a constant": lambda m, x: x / 3.0,
    "relu": lambda m, x: torch.relu(x) - torch.relu(-x),
    "index": lambda m, x: x[..., torch.arange(31, -1, -1)],
    # DeltaNet's chunked scan with its keys held constant: linear in the right-hand side
    "solve with a constant matrix": lambda m, x: torch.linalg.solve_triangular(
        torch.eye(32) + torch.tril(torch.ones(32, 32), -1) / 32, x[..., None], upper=False
    )[..., 0],
}
NONLINEAR = {
    "exp": (lambda m, x: x.exp() - 1, "exp"),
    "square": (lambda m, x: x * x, "mul of two input-dependent tensors"),
    "division": (
        lambda m, x: x / (x.abs().sum(-1, keepdim=True) + 1),
        "division by an input-dependent tensor",
    ),
    "softmax": (lambda m, x: torch.softmax(x, -1) * 32, "softmax"),
    "cumprod": (lambda m, x: torch.cumprod(torch.tanh(x), -1), "tanh"),
    "solve with an input-dependent matrix": (
        lambda m, x: torch.linalg.solve_triangular(
            torch.diag_embed(2 + torch.relu(x)), x[..., None], upper=False
        )[..., 0],
        "linalg_solve_triangular",
    ),
}


def _model_with(fn) -> nn.Module:  # type: ignore[no-untyped-def]
    model = F.build("llama")
    layer = model.model.layers[1]
    layer.post_attention_layernorm = nn.Sequential(layer.post_attention_layernorm, Op(fn))
    return model


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_operations_need_no_rule(name: str) -> None:
    model = _model_with(LINEAR[name])
    with lxt_plus.patched(model, "conservative-check") as handle:
        ops = handle.plan.operations
        assert ops is not None and ops.ok, ops
        assert "accounted for" in handle.describe()
    exp = lxt_plus.explain(model, IDS, rules="conservative-check")
    c = exp.conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))


@pytest.mark.parametrize("name", list(NONLINEAR))
def test_nonlinear_operations_are_refused_by_name(name: str) -> None:
    fn, op = NONLINEAR[name]
    model = _model_with(fn)
    before = [p.detach().clone() for p in model.parameters()]
    where = "model.layers.1.post_attention_layernorm.1 (Op; would fit:"
    with pytest.raises(UnsupportedModelError, match="operation") as info:
        lxt_plus.patch(model, "attnlrp")
    assert f"{op} in {where}" in str(info.value)
    assert not is_patched(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.warns(LxtPlusWarning, match="NOT conservative"):
        exp = lxt_plus.explain(model, IDS, strict=False)
    assert torch.isfinite(exp.relevance).all()


def test_gradient_preset_is_not_checked() -> None:
    model = _model_with(NONLINEAR["exp"][0])
    with lxt_plus.patched(model, "gradient") as handle:
        assert handle.plan.operations is not None and not handle.plan.operations.checked


def test_constant_added_on_the_path_is_a_leak_under_conservative_check() -> None:
    """A non-zero constant that is no bias parameter (a table computed in forward) is refused where
    biases are zeroed to conserve; the presets that let biases absorb relevance accept it."""
    model = _model_with(lambda m, x: x + torch.ones_like(x).detach() * 0.25)
    with pytest.raises(UnsupportedModelError, match="addition of a non-zero constant"):
        lxt_plus.patch(model, "conservative-check")
    with lxt_plus.patched(model, "ah-lrp") as handle:
        assert handle.plan.operations is not None and handle.plan.operations.ok


def test_audit_names_the_operation() -> None:
    model = _model_with(NONLINEAR["exp"][0])
    report = lxt_plus.audit(model, "ah-lrp")
    assert not report.ok
    assert report.operations is not None and "exp" in [f.op for f in report.operations.unknown]
    assert "operations: 2 of" in str(report) and "exp in model.layers.1" in str(report)
