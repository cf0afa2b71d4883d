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
from lxt_plus import rules as R
from lxt_plus.errors import ConfigError
from lxt_plus.functional import grad_scale


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
