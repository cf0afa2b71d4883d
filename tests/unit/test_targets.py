"""Token targets given as strings: warnings for several tokens, a missing leading space, a class label."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import lxt_plus
from lxt_plus.api.explain import resolve_token
from lxt_plus.errors import TargetError, TargetWarning

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402

WORDS = [
    "Paris",
    "ĠParis",
    "ĠLyon",
    "yon",
    "Ġgreat",
    "great",
    "Ġcapital",
    "Ġof",
    "ĠFrance",
    "Ġis",
    "The",
    "POS",
    "IT",
    "IVE",
    "Ġmat",
]


def byte_bpe() -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, built offline): 'Paris' and ' Paris' are different single
    tokens, ' Lyon' is one token but 'Lyon' splits into 'L' + 'yon'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    # each word built from its prefixes, one merge per character; words with their space first, so that
    # their merges rank higher (else " Paris" would merge "Paris" first and stay "Ġ" + "Paris")
    for word in sorted(WORDS, key=lambda w: not w.startswith("Ġ")):
        for k in range(2, len(word) + 1):
            left, right = word[: k - 1], word[k - 1]
            if word[:k] not in vocab:
                merges.append((left, right))
                vocab[word[:k]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe() -> Any:
    tok = byte_bpe()
    assert tok.convert_ids_to_tokens(tok.encode("Paris")) == ["Paris"]
    assert tok.convert_ids_to_tokens(tok.encode(" Paris")) == ["ĠParis"]
    assert tok.convert_ids_to_tokens(tok.encode("Lyon")) == ["L", "yon"]
    return tok


def resolve(tok: Any, spec: str | int, **kw: Any) -> tuple[tuple[int, ...], list[str]]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ids, _ = resolve_token(tok, spec, len(tok), **kw)
    assert all(issubclass(w.category, TargetWarning) for w in seen)
    return ids, [str(w.message) for w in seen]


def test_single_tokens_and_ids_pass_silently(bpe: Any) -> None:
    assert resolve(bpe, " Paris")[1] == []
    assert resolve(bpe, " Lyon")[1] == []
    assert resolve(bpe, bpe.convert_tokens_to_ids("Paris"))[1] == []  # an id is taken as meant
    word_level = F.tiny_tokenizer()  # no leading-space variants at all
    assert resolve(word_level, "paris")[1] == []


def test_several_tokens_are_named(bpe: Any) -> None:
    ids, messages = resolve(bpe, " great capital")
    assert len(ids) == 2
    assert messages == [
        f"target ' great capital' splits into 2 tokens [' great', ' capital'] (ids {list(ids)}); their logits "
        "at the explained position are summed, which is not the probability of the word"
    ]


def test_missing_leading_space_is_suggested(bpe: Any) -> None:
    paris = bpe.convert_tokens_to_ids("ĠParis")
    _, messages = resolve(bpe, "Paris")  # one token, but not the one that follows a word
    assert messages == [
        f"target 'Paris' is the token 'Paris' without a leading space, while ' Paris' is one token (ids "
        f"[{paris}]), the form a word takes after another word: pass ' Paris' if you meant that"
    ]
    _, messages = resolve(bpe, "Lyon")  # a rare split of a word that is one token with its space
    assert len(messages) == 1
    assert "'Lyon' splits into 2 tokens ['L', 'yon']" in messages[0]
    assert "while ' Lyon' is one token" in messages[0] and "pass ' Lyon' if you meant that" in messages[0]


def test_label_names_on_a_causal_lm_warn(bpe: Any) -> None:
    _, messages = resolve(bpe, "POSITIVE")
    assert len(messages) == 1
    assert messages[0].startswith("target 'POSITIVE' looks like a class label, but a causal LM has no labels")
    assert "['POS', 'IT', 'IVE']" in messages[0]
    _, messages = resolve(bpe, "LABEL_1")
    assert "looks like a class label" in messages[0]


def test_strict_target_raises(bpe: Any) -> None:
    for spec in ("Paris", "Lyon", "POSITIVE", " great capital"):
        with pytest.raises(TargetError, match="strict target: pass one unambiguous token, or a token id"):
            resolve_token(bpe, spec, len(bpe), strict_target=True)
    assert resolve_token(bpe, " Paris", len(bpe), strict_target=True)[0] == (
        bpe.convert_tokens_to_ids("ĠParis"),
    )
    with pytest.raises(TargetError, match="contrast 'Lyon' splits"):
        resolve_token(bpe, "Lyon", len(bpe), "contrast", strict_target=True)


def test_explain_warns_at_the_callers_line(bpe: Any) -> None:
    model = F.build("llama", vocab_size=len(bpe))
    with pytest.warns(TargetWarning, match="pass ' Paris' if you meant that") as record:
        res = lxt_plus.explain(model, "The capital of France is", tokenizer=bpe, target="Paris")
    assert res.targets[0].ids == (bpe.convert_tokens_to_ids("Paris"),)  # still explained as asked
    assert record[0].filename == __file__  # points at this line, not inside lxt_plus
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lxt_plus.explain(model, "The capital of France is", tokenizer=bpe, target=" Paris")  # silent
    # a classifier resolves label names, never tokens: no warning
    labels = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
    clf = F.build("bert", vocab_size=len(bpe), id2label=labels, label2id={v: k for k, v in labels.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lxt_plus.explain(clf, "The capital", tokenizer=bpe, target="POSITIVE").targets[0].ids == (2,)


def test_explain_strict_target_raises(bpe: Any) -> None:
    model = F.build("llama", vocab_size=len(bpe))
    with pytest.raises(TargetError, match="strict target"):
        lxt_plus.explain(model, "The capital of France is", tokenizer=bpe, target="Paris", strict_target=True)
    with pytest.raises(TargetError, match="contrast 'Lyon' splits"):
        lxt_plus.explain(
            model,
            "The capital of France is",
            tokenizer=bpe,
            target=" Paris",
            contrast="Lyon",
            strict_target=True,
        )
    res = lxt_plus.explain(
        model, "The capital of France is", tokenizer=bpe, target=" Paris", strict_target=True
    )
    assert res.targets[0].ids == (bpe.convert_tokens_to_ids("ĠParis"),)
