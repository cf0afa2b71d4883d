"""Any scalar as the target: ``target=`` a function from the model output to one value per row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lxt_plus
from lxt_plus.errors import TargetError

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402

IDS = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))


def test_a_margin_function_equals_target_with_contrast() -> None:
    model = F.build("llama")
    margin = lxt_plus.explain(model, IDS, target=lambda out: out.logits[:, -1, 5] - out.logits[:, -1, 7])
    pair = lxt_plus.explain(model, IDS, target=5, contrast=7)
    torch.testing.assert_close(margin.target_logit, pair.target_logit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(margin.batch_relevance, pair.batch_relevance, rtol=1e-5, atol=1e-6)
    assert margin.targets[0].kind == "function" and margin.targets[0].label == "<lambda>"
    assert margin.probability is None


def test_classifier_margin_function() -> None:
    model = F.build("bert", "seqcls")
    margin = lxt_plus.explain(model, IDS, target=lambda out: out.logits[:, 1] - out.logits[:, 0])
    pair = lxt_plus.explain(model, IDS, target=1, contrast=0)
    torch.testing.assert_close(margin.batch_relevance, pair.batch_relevance, rtol=1e-5, atol=1e-6)


def test_a_span_sum_is_conserved_against_the_function_value() -> None:
    """Every position's logits are kept for a function: a sum over a span of positions works, and
    with biases zeroed the relevance sums to that value."""
    model = F.build("llama")

    def span(out: object) -> torch.Tensor:
        return out.logits[:, 2:5, 11].sum(-1)  # type: ignore[attr-defined]

    res = lxt_plus.explain(model, IDS, target=span, rules="conservative-check")
    with torch.no_grad():
        model.eval()
        expected = model(IDS).logits[:, 2:5, 11].sum(-1)
    assert res.targets[0].label == "span"
    # biases of this family are zero already, so the patched logits equal the plain ones
    torch.testing.assert_close(res.target_logit, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.batch_relevance.sum(-1), res.target_logit, rtol=1e-4, atol=1e-5)
    # relevance reaches tokens before the span's end only (causal model)
    assert res.batch_relevance[:, 5:].abs().max() == 0
    assert res.batch_relevance[:, :5].abs().max() > 0


def test_log_probability_target() -> None:
    model = F.build("llama")
    res = lxt_plus.explain(model, IDS, target=lambda out: out.logits[:, -1].log_softmax(-1)[:, 5])
    with torch.no_grad():
        expected = model(IDS).logits[:, -1].log_softmax(-1)[:, 5]
    torch.testing.assert_close(res.target_logit, expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(res.batch_relevance).all() and res.batch_relevance.abs().max() > 0


def test_plain_model_function_target() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    res = lxt_plus.explain(model, x, target=lambda out: out[:, 2] - out[:, 0])
    pair = lxt_plus.explain(model, x, target=2, contrast=0)
    torch.testing.assert_close(res.batch_relevance, pair.batch_relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("function", "match"),
    [
        (lambda out: out.logits[:, -1], r"must return one float per row, a \(2,\) tensor; got a \(2, 96\)"),
        (lambda out: 3.0, "must return one float per row.*got float"),
        (lambda out: torch.ones(2), "does not depend on the model output"),
        (lambda out: out.no_such_field, "raised AttributeError"),
    ],
)
def test_bad_target_functions_fail_clearly(function: object, match: str) -> None:
    model = F.build("llama")
    with pytest.raises(TargetError, match=match):
        lxt_plus.explain(model, IDS, target=function)
    assert not lxt_plus.engine.patching.is_patched(model)


def test_a_target_function_takes_no_contrast() -> None:
    with pytest.raises(TargetError, match="cannot take a contrast"):
        lxt_plus.explain(F.build("llama"), IDS, target=lambda out: out.logits[:, -1, 5], contrast=7)


def _right_padded() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(IDS)
    mask[1, -3:] = 0
    return IDS.clone(), mask


def test_padded_batches_need_the_positions_argument() -> None:
    model = F.build("llama")
    ids, mask = _right_padded()
    with pytest.raises(TargetError, match="on a padded batch.*second argument for the positions"):
        lxt_plus.explain(model, ids, attention_mask=mask, target=lambda out: out.logits[:, -1, 5])
    with pytest.raises(TargetError, match="with position=.*second argument"):
        lxt_plus.explain(model, IDS, position=3, target=lambda out: out.logits[:, 3, 5])


def test_the_positions_argument_gives_each_row_its_own_position() -> None:
    model = F.build("llama")
    ids, mask = _right_padded()

    def token_5(out: object, pos: torch.Tensor) -> torch.Tensor:
        return out.logits[torch.arange(len(pos)), pos, 5]  # type: ignore[attr-defined]

    res = lxt_plus.explain(model, ids, attention_mask=mask, target=token_5)
    pair = lxt_plus.explain(model, ids, attention_mask=mask, target=5)
    torch.testing.assert_close(res.target_logit, pair.target_logit, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.batch_relevance, pair.batch_relevance, rtol=1e-5, atol=1e-6)
    assert [t.position for t in res.targets] == [6, 3]
    at = lxt_plus.explain(model, IDS, position=2, target=token_5)
    torch.testing.assert_close(
        at.batch_relevance, lxt_plus.explain(model, IDS, position=2, target=5).batch_relevance
    )


def test_conservation_repr_says_a_non_linear_function_is_not_conserved() -> None:
    res = lxt_plus.explain(
        F.build("llama"),
        IDS[0],
        target=lambda out: out.logits[:, -1].log_softmax(-1)[:, 5],
        rules="conservative-check",
    )
    assert "only a function that is linear in the logits" in repr(res.conservation)
