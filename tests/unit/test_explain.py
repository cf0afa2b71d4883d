"""explain(): inputs, targets, contrast, batching, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lxt_plus
from lxt_plus.errors import (
    InputError,
    LxtPlusError,
    PresetError,
    TargetError,
    TargetWarning,
    TokenizerMismatchError,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    return F.build("llama"), F.tiny_tokenizer()


@pytest.fixture(scope="module")
def clf():  # type: ignore[no-untyped-def]
    model = F.build("bert")
    model.config.id2label = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    return model, F.tiny_tokenizer()


def test_default_target_is_the_prediction_at_the_last_real_token(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    res = lxt_plus.explain(model, "the capital of france is", tokenizer=tok)
    ids = tok("the capital of france is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert res.targets[0].ids == (int(logits.argmax()),)
    assert res.targets[0].position == ids.shape[1] - 1
    torch.testing.assert_close(res.target_logit[0], logits.max(), rtol=1e-5, atol=1e-6)
    assert res.relevance.shape == (ids.shape[1],)
    assert res.tokens[0] == ["the", "capital", "of", "france", "is"]
    assert 0 < float(res.probability[0]) <= 1


def test_token_string_contrast_and_multi_token_targets(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    text = "the capital of france is"
    paris = lxt_plus.explain(model, text, tokenizer=tok, target="paris")
    lyon = lxt_plus.explain(model, text, tokenizer=tok, target="lyon")
    both = lxt_plus.explain(model, text, tokenizer=tok, target="paris", contrast="lyon")
    torch.testing.assert_close(both.target_logit, paris.target_logit - lyon.target_logit)
    torch.testing.assert_close(both.relevance, paris.relevance - lyon.relevance, rtol=1e-4, atol=1e-6)
    assert both.targets[0].describe() == "'paris' vs 'lyon' @ position 4"
    with pytest.warns(TargetWarning, match=r"'paris lyon' splits into 2 tokens \['paris', 'lyon'\]"):
        two = lxt_plus.explain(model, text, tokenizer=tok, target="paris lyon")  # two tokens: sum of logits
    torch.testing.assert_close(two.target_logit, paris.target_logit + lyon.target_logit)
    by_id = lxt_plus.explain(model, text, tokenizer=tok, target=tok.convert_tokens_to_ids("paris"))
    torch.testing.assert_close(by_id.relevance, paris.relevance)


def test_position_and_per_row_targets(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    res = lxt_plus.explain(model, "the capital of france is", tokenizer=tok, position=2, target="france")
    assert res.targets[0].position == 2
    assert torch.all(res.relevance[3:] == 0)  # causal: later tokens cannot matter
    batch = lxt_plus.explain(
        model, ["the good film", "a very bad movie"], tokenizer=tok, target=["good", "bad"]
    )
    assert [t.label for t in batch.targets] == ["good", "bad"]
    assert batch.relevance.shape == (2, 4)


def test_classifier_targets_by_label_and_index(clf) -> None:  # type: ignore[no-untyped-def]
    model, tok = clf
    res = lxt_plus.explain(model, "a gorgeous witty film", tokenizer=tok, target="positive")
    assert res.targets[0].label == "POSITIVE" and res.targets[0].ids == (2,)
    res_i = lxt_plus.explain(model, "a gorgeous witty film", tokenizer=tok, target=2)
    torch.testing.assert_close(res.relevance, res_i.relevance)
    con = lxt_plus.explain(
        model, "a gorgeous witty film", tokenizer=tok, target="POSITIVE", contrast="NEGATIVE"
    )
    assert con.targets[0].contrast_label == "NEGATIVE"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"target": "ECSTATIC"},
            TargetError,
            "unknown target label 'ECSTATIC'; valid labels: NEGATIVE, NEUTRAL, POSITIVE",
        ),
        ({"target": 7}, TargetError, "class 7 is out of range: the model has 3 classes"),
        ({"rules": "atnlrp"}, PresetError, "unknown preset 'atnlrp' \\(did you mean 'attnlrp'\\?\\)"),
        ({"capture": "layer"}, InputError, "unknown capture 'layer'"),
    ],
)
def test_classifier_errors_are_clear(clf, kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    model, tok = clf
    with pytest.raises(error, match=message):
        lxt_plus.explain(model, "a good film", tokenizer=tok, **kwargs)


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error", "message"),
    [
        ("", {}, InputError, "text 0 is empty or whitespace only"),
        ("   ", {}, InputError, "empty or whitespace only"),
        ([], {}, InputError, "empty list of inputs"),
        ("the film", {"tokenizer": None}, InputError, "text input needs tokenizer"),
        ("the film", {"target": 10_000}, TargetError, "token id 10000 is out of range: valid ids are 0..95"),
        ("the film", {"target": "zebra"}, TargetError, "'zebra' is not in the tokenizer's vocabulary"),
        ("the film", {"position": 9}, TargetError, "position 9 is out of range for a sequence of 2 tokens"),
        (torch.tensor([[5, 500]]), {}, TokenizerMismatchError, "token id 500 is outside"),
        (torch.randn(1, 4), {}, InputError, "takes integer token ids"),
        (torch.tensor([[5, 6]]), {"attention_mask": torch.tensor([[0, 0]])}, InputError, "has no real token"),
    ],
)
def test_bad_input_fails_clearly(lm, inputs, kwargs, error, message) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    kwargs = {"tokenizer": tok, **kwargs}
    with pytest.raises(error, match=message):
        lxt_plus.explain(model, inputs, **kwargs)
    assert not lxt_plus.engine.patching.is_patched(model)
    assert issubclass(error, LxtPlusError)


def test_context_too_long_is_a_clear_error(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    with pytest.raises(lxt_plus.errors.ContextTooLongError, match="accepts at most 64 positions"):
        lxt_plus.explain(model, " ".join(["film"] * 80), tokenizer=tok)


def test_parameters_requiring_grad_are_restored_and_untouched(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.model.norm.weight.requires_grad_(False)
    lxt_plus.explain(model, "the good film", tokenizer=tok)
    assert all(p.grad is None for p in model.parameters())
    assert model.model.norm.weight.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.norm.weight")
    model.model.norm.weight.requires_grad_(flags["model.norm.weight"])


def test_model_in_train_mode_is_explained_without_dropout_and_restored() -> None:
    model = F.build("bert", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    ids = torch.randint(4, 90, (6,), generator=torch.Generator().manual_seed(0))
    ref = lxt_plus.explain(model, ids).relevance
    model.train()
    again = lxt_plus.explain(model, ids).relevance
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(again, ref)


# ------------------------------------------------------------------------------ chat templates
CHAT_TEMPLATE = (
    "<|system|> a kind king <|end|>"
    "{% for m in messages %}<|user|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_tokenizer():  # type: ignore[no-untyped-def]
    """The word-level test tokenizer with a chat template that wraps the user's text in a system turn.

    ``<|system|>``/``<|end|>`` are special tokens. ``<|user|>``, ``<|eot|>``, ``<|assistant|>`` and
    the system prompt's words are ordinary tokens: only their place outside the user's text hides
    them, and ``<|user|>``/``<|eot|>`` touch the text (no space), at the edges of its span."""
    from tokenizers import AddedToken

    tok = F.tiny_tokenizer(vocab_size=90)
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<|user|>", "<|eot|>", "<|assistant|>")])
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) <= 96  # fits the tiny model's vocabulary
    return tok


def test_chat_template_tokens_are_hidden_and_the_users_are_not(lm) -> None:  # type: ignore[no-untyped-def]
    model, _ = lm
    tok = chat_tokenizer()
    # row 1 repeats the system prompt's words: only the user's own copy is visible
    texts = ["the film was good", "a kind king"]
    res = lxt_plus.explain(model, texts, tokenizer=tok, chat=True, rules="attnlrp")
    head = ["<|system|>", "a", "kind", "king", "<|end|>", "<|user|>"]
    tail = ["<|eot|>", "<|assistant|>"]
    assert res.tokens[0] == [*head, "the", "film", "was", "good", *tail]
    assert res.tokens[1][:11] == [*head, "a", "kind", "king", *tail]
    assert res.attention_mask.tolist() == [[1] * 12, [1] * 11 + [0]]
    t, f = True, False
    assert res.hidden is not None
    assert res.hidden.tolist() == [
        [t, t, t, t, t, t, f, f, f, f, t, t],
        [t, t, t, t, t, t, f, f, f, t, t, f],  # the pad position is not "hidden": it is padding
    ]
    # the explained position is the generation prompt, the last real token of each row
    assert [r.position for r in res.targets] == [11, 10]
    # hidden tokens keep their relevance (conservation); hide_special leaves them out of the views
    assert bool((res.batch_relevance[0][res.hidden[0]] != 0).any())
    for row, words in ((0, ["the", "film", "was", "good"]), (1, ["a", "kind", "king"])):
        toks, rel = res.real_tokens(row, hide_special=True)
        assert toks == words
        assert torch.equal(rel, res.batch_relevance[row][~res.hidden[row] & res.attention_mask[row].bool()])
        assert len(res.real_tokens(row)[0]) == int(res.attention_mask[row].sum())
        assert sorted(w for w, _ in res.top_tokens(20, row, hide_special=True)) == sorted(words)
        assert {w for w, _ in res.top_tokens(20, row)} >= {
            "<|system|>",
            "<|user|>",
            "<|eot|>",
            "<|assistant|>",
        }
    from lxt_plus.render._common import row_items  # what every renderer shows

    assert [s.strip() for s in row_items(res, 1, hide_special=True)[0]] == ["a", "kind", "king"]
    # without a chat template only special tokens are hidden: none here
    plain = lxt_plus.explain(model, "the film was good", tokenizer=tok)
    assert plain.tokens[0] == ["the", "film", "was", "good"] and not plain.hidden.any()
