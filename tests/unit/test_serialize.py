"""JSON round trips of explanations and generation explanations."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from lxt_plus.errors import InputError
from lxt_plus.results.result import (
    Explanation,
    GenerationExplanation,
    Target,
    explanation_from_dict,
    generation_from_dict,
)
from lxt_plus.results.serialize import FORMAT_VERSION, explanation_to_dict, generation_to_dict


def make_batch() -> Explanation:
    return Explanation(
        batch_relevance=torch.tensor([[0.5, -0.2, 0.0], [0.125, 0.25, -0.75]], dtype=torch.float64),
        tokens=[["The", "Ġcat", "<pad>"], ["A", "Ġdog", "Ġran"]],
        token_ids=torch.tensor([[1, 2, 0], [4, 5, 6]]),
        attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]),
        targets=[
            Target(kind="token", ids=(5,), label=" mat", position=2),
            Target(kind="class", ids=(1, 2), label="pos", contrast_ids=(0,), contrast_label="neg"),
        ],
        target_logit=torch.tensor([1.0, 2.0]),
        probability=torch.tensor([0.3, 0.4]),
        rules="attnlrp",
        single=False,
        captures={"layers": {"0": torch.ones(2, 3)}, "heads": torch.arange(4).reshape(2, 2), "note": "x"},
        extra_relevance=torch.tensor([0.01, -0.02]),
        hidden=torch.tensor([[False, False, True], [True, False, False]]),
    )


def test_json_round_trip() -> None:
    exp = make_batch()
    text = exp.to_json()
    back = Explanation.from_json(text)
    assert back.batch_relevance.dtype == torch.float32
    assert torch.equal(back.batch_relevance, exp.batch_relevance.float())
    assert torch.equal(back.token_ids, exp.token_ids) and back.token_ids.dtype == torch.long
    assert torch.equal(back.attention_mask, exp.attention_mask)
    assert torch.equal(back.target_logit, exp.target_logit)
    assert torch.equal(back.probability, exp.probability)
    assert torch.equal(back.extra_relevance, exp.extra_relevance)
    assert back.hidden.dtype == torch.bool and torch.equal(back.hidden, exp.hidden)
    assert back.tokens == exp.tokens and back.targets == exp.targets
    assert (back.rules, back.single, back.modality) == ("attnlrp", False, "tokens")
    assert torch.equal(back.captures["layers"]["0"], torch.ones(2, 3))
    assert back.captures["heads"].dtype == torch.int64 and back.captures["heads"].shape == (2, 2)
    assert back.captures["note"] == "x"
    assert back.to_json() == exp.to_json()


def test_single_and_optional_fields() -> None:
    exp = Explanation(
        batch_relevance=torch.tensor([[0.5, -0.25]]),
        tokens=[["a", "b"]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="output", ids=(0,), label="y")],
        target_logit=torch.tensor([0.25]),
        probability=None,
        rules="epsilon",
        modality="features",
    )
    d = explanation_to_dict(exp)
    json.dumps(d, allow_nan=False)
    assert d["format"] == "lxt_plus.Explanation" and d["version"] == FORMAT_VERSION
    assert d["relevance"] == [[0.5, -0.25]] and d["token_ids"] is None
    assert d["targets"] == [
        {
            "kind": "output",
            "ids": [0],
            "label": "y",
            "position": None,
            "contrast_ids": [],
            "contrast_label": None,
        }
    ]
    back = explanation_from_dict(d)
    assert back.single and back.token_ids is None and back.probability is None and back.hidden is None
    assert back.modality == "features" and torch.equal(back.relevance, torch.tensor([0.5, -0.25]))


def test_pixels_keep_their_shape() -> None:
    exp = Explanation(
        batch_relevance=torch.randn(1, 3, 4),
        tokens=[[]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="output", ids=(1,), label="1")],
        target_logit=torch.tensor([1.0]),
        probability=None,
        rules="epsilon",
        modality="pixels",
    )
    back = Explanation.from_json(exp.to_json())
    assert back.batch_relevance.shape == (1, 3, 4) and torch.equal(back.batch_relevance, exp.batch_relevance)


def _broken(**changes: Any) -> dict[str, Any]:
    d = explanation_to_dict(make_batch())
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "expected a dict"),
        (_broken(format="something"), "not a serialised Explanation"),
        (_broken(version=99), "unsupported Explanation format version 99"),
        (_broken(relevance=...), "missing the field.* relevance"),
        (_broken(relevance=[[1.0, 2.0], [3.0]]), "'relevance' is not a rectangular list"),
        (_broken(relevance=[1.0, 2.0]), "must be \\(batch, ...\\)"),
        (_broken(tokens=[["a"]]), "'tokens' must be a list of 2"),
        (_broken(targets=[{"kind": "token"}] * 2), "malformed target"),
        (_broken(targets=["x", "y"]), "each target must be a dict"),
        (_broken(target_logit=[1.0]), "'target_logit' must have 2"),
        (_broken(token_ids=[["a"]]), "'token_ids' is not a rectangular list"),
    ],
)
def test_malformed(data: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        explanation_from_dict(data)


def test_generation_round_trip() -> None:
    gen = GenerationExplanation(
        tokens=["Hi", "Ġthere", "!"],
        token_ids=torch.tensor([1, 2, 3]),
        prompt_length=1,
        matrix=torch.tensor([[0.5, 0.0, 0.0], [0.25, -0.5, 0.0]]),
        target_logit=torch.tensor([2.0, 3.0]),
        rules="attnlrp",
    )
    d = json.loads(json.dumps(gen.to_dict()))
    assert d == generation_to_dict(gen) and d["format"] == "lxt_plus.GenerationExplanation"
    back = generation_from_dict(d)
    assert back.tokens == gen.tokens and back.prompt_length == 1 and back.rules == "attnlrp"
    assert torch.equal(back.matrix, gen.matrix) and torch.equal(back.token_ids, gen.token_ids)
    assert torch.equal(back.target_logit, gen.target_logit)
    with pytest.raises(InputError, match="does not fit together"):
        generation_from_dict({**d, "matrix": [[0.0, 1.0]]})
    with pytest.raises(InputError, match="not a serialised GenerationExplanation"):
        generation_from_dict(explanation_to_dict(make_batch()))


def test_unserialisable_capture() -> None:
    exp = make_batch()
    exp.captures = {"hook": object()}
    with pytest.raises(InputError, match="cannot serialise captures.hook of type object"):
        exp.to_dict()
