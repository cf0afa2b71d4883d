"""A rule of one's own: one class plus ``@register_rule``, then usable by name in YAML and presets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import lxt_plus
from lxt_plus.engine import rules as R
from lxt_plus.engine.functional import grad_scale
from lxt_plus.engine.install import Installed, Site
from lxt_plus.errors import ConfigError


@pytest.fixture
def halve() -> Iterator[type[R.Rule]]:
    @lxt_plus.register_rule
    @dataclass(frozen=True, repr=False)
    class Halve(R.Rule):
        """Passes half of the relevance of a module's output on to its input (a test rule)."""

        name: ClassVar[str] = "test-halve"
        factor: float = 0.5

        def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
            def fwd(*args: Any, **kwargs: Any) -> Any:
                return grad_scale(forward(*args, **kwargs), self.factor)

            return fwd

    yield Halve
    del R.RULES["test-halve"]


def test_a_registered_rule_works_by_name_in_yaml(halve: type[R.Rule], tmp_path: Path) -> None:
    assert "test-halve" in lxt_plus.list_rules()
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\nbase: gradient\nrules:\n  - select: linear\n    rule: {test-halve: {factor: 0.25}}\n"
    )
    preset = lxt_plus.load_preset(path)
    assert dict(preset.rules)["linear"] == halve(factor=0.25)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    x = torch.randn(1, 3)
    mine = lxt_plus.explain(model, x, target=0, rules=path).relevance
    plain = lxt_plus.explain(model, x, target=0, rules="gradient").relevance
    torch.testing.assert_close(mine, 0.25 * plain)


def test_a_name_cannot_be_taken_twice(halve: type[R.Rule]) -> None:
    with pytest.raises(ConfigError, match="'test-halve' is already registered"):

        @lxt_plus.register_rule
        @dataclass(frozen=True, repr=False)
        class Other(R.Rule):
            name: ClassVar[str] = "test-halve"

    lxt_plus.register_rule(halve)  # the same class again is a no-op
    with pytest.raises(ConfigError, match="needs a Rule subclass"):
        lxt_plus.register_rule(int)  # type: ignore[arg-type]


def test_unknown_rule_lists_the_registered_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown rule 'zplsu' \(did you mean 'zplus'\?\).*wsquare"):
        R.rule_from_spec("zplsu")


@dataclass(frozen=True, repr=False)
class _Typed(R.Rule):
    name: ClassVar[str] = "test-typed"
    steps: int = 1
    mode: str = "a"
    flag: bool = False
    scale: float = 1.0
    bound: float | tuple[float, ...] | None = None


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"steps": 3, "mode": "b", "flag": True}, _Typed(steps=3, mode="b", flag=True)),
        ({"scale": "1e-3", "bound": [1, 2]}, _Typed(scale=1e-3, bound=(1.0, 2.0))),
        ({"bound": 0.5}, _Typed(bound=0.5)),
        ({"bound": None}, _Typed(bound=None)),
    ],
)
def test_parameters_take_their_declared_types(params: dict[str, object], expected: R.Rule) -> None:
    lxt_plus.register_rule(_Typed)
    try:
        rule = R.rule_from_spec({"test-typed": params})
        assert rule == expected
        assert type(rule.steps) is int and type(rule.scale) is float  # type: ignore[attr-defined]
    finally:
        del R.RULES["test-typed"]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"steps": 2.5}, "'steps' of rule 'test-typed' is a whole number"),
        ({"flag": 1}, "'flag' of rule 'test-typed' is true or false"),
        ({"mode": 3}, "'mode' of rule 'test-typed' is a string"),
        ({"scale": "x"}, "'scale' of rule 'test-typed' is a number"),
        ({"bound": ["a"]}, "'bound' of rule 'test-typed' is a list of numbers"),
    ],
)
def test_parameters_of_the_wrong_type_are_config_errors(params: dict[str, object], match: str) -> None:
    lxt_plus.register_rule(_Typed)
    try:
        with pytest.raises(ConfigError, match=match):
            R.rule_from_spec({"test-typed": params})
    finally:
        del R.RULES["test-typed"]


def test_a_rule_with_its_own_install_route_needs_no_other_code() -> None:
    """A rule may install itself another way (here a forward hook): patching only runs install()
    and its undo steps, so the hook is gone after remove() and the plan says the route."""

    @lxt_plus.register_rule
    @dataclass(frozen=True, repr=False)
    class HookHalf(R.Rule):
        name: ClassVar[str] = "test-hook-half"

        def install(self, site: Site) -> Installed:
            handle = site.module.register_forward_hook(lambda m, a, out: grad_scale(out, 0.5))
            return Installed("forward", [handle.remove])

    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 2, bias=False))
        x = torch.randn(1, 3)
        preset = lxt_plus.get_preset("gradient").override("linear", "test-hook-half")
        with lxt_plus.patched(model, preset) as handle:
            assert "test-hook-half" in handle.describe()
            assert len(model[0]._forward_hooks) == 1
        assert len(model[0]._forward_hooks) == 0
        mine = lxt_plus.explain(model, x, target=0, rules=preset).relevance
        plain = lxt_plus.explain(model, x, target=0, rules="gradient").relevance
        torch.testing.assert_close(mine, 0.5 * plain)
    finally:
        del R.RULES["test-hook-half"]


def test_noop_rules_are_said_by_the_rule() -> None:
    assert R.Pass().is_noop() and R.Epsilon(0.0).is_noop()
    assert not R.Epsilon(1e-6).is_noop() and not R.AttnLRP().is_noop()
