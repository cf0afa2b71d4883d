"""Sub-word aggregation, display strings and normalisation."""

from __future__ import annotations

import pytest
import torch

from lxt_plus.errors import InputError
from lxt_plus.results.words import aggregate_words, detect_scheme, display_token, normalize


def _agg(tokens: list[str], scheme: str = "auto") -> tuple[list[str], list[float]]:
    rel = torch.arange(1, len(tokens) + 1, dtype=torch.float64)  # 1, 2, 3, ... makes every sum unique
    words, summed = aggregate_words(tokens, rel, scheme)
    assert summed.dtype == torch.float64
    assert summed.sum().item() == pytest.approx(rel.sum().item())  # relevance is conserved
    return words, summed.tolist()


def test_wordpiece() -> None:
    words, rel = _agg(["[CLS]", "un", "##believ", "##able", "movie", "!", "[SEP]"])
    assert words == ["[CLS]", "unbelievable", "movie", "!", "[SEP]"]
    assert rel == [1.0, 2 + 3 + 4, 5.0, 6.0, 7.0]


def test_wordpiece_continuation_after_special_starts_a_new_word() -> None:
    words, rel = _agg(["[CLS]", "##x", "y"], scheme="wordpiece")
    assert words == ["[CLS]", "x", "y"]
    assert rel == [1.0, 2.0, 3.0]


def test_byte_level_bpe() -> None:
    words, rel = _agg(["<|endoftext|>", "The", "Ġcat", "Ġsat", "ting", ".", "Ċ", "Hi", "Ġthere"])
    assert words == ["<|endoftext|>", "The", "cat", "satting.", "\u21b5", "Hi", "there"]
    assert rel == [1.0, 2.0, 3.0, 4 + 5 + 6, 7.0, 8.0, 9.0]


def test_bpe_decoded_with_plain_spaces() -> None:
    words, rel = _agg(["The", " cat", " s", "at", "."])
    assert words == ["The", "cat", "sat."]
    assert rel == [1.0, 2.0, 3 + 4 + 5]


def test_chat_template_specials_are_their_own_words() -> None:
    words, rel = _agg(["<|im_start|>", "user", "Ċ", "Good", "Ġmor", "ning", "<|im_end|>", "Ċ"])
    assert words == ["<|im_start|>", "user", "\u21b5", "Good", "morning", "<|im_end|>", "\u21b5"]
    assert rel == [1.0, 2.0, 3.0, 4.0, 5 + 6, 7.0, 8.0]


def test_sentencepiece() -> None:
    words, rel = _agg(["<s>", "▁Hel", "lo", "▁world", "▁", "1", "2", "</s>"])
    assert words == ["<s>", "Hello", "world", "12", "</s>"]
    assert rel == [1.0, 2 + 3, 4.0, 5 + 6 + 7, 8.0]


def test_explicit_scheme_overrides_detection() -> None:
    # As BPE, "Ġ"-less pieces continue a word; as WordPiece each of them starts one.
    assert _agg(["a", "b", "Ġc"], scheme="bpe")[0] == ["ab", "c"]
    assert _agg(["a", "b", "Ġc"], scheme="wordpiece")[0] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("tokens", "scheme"),
    [
        (["▁a", "b"], "sentencepiece"),
        (["a", "Ġb"], "bpe"),
        (["a", " b"], "bpe"),
        (["a", "##b"], "wordpiece"),
        (["a", "b"], "wordpiece"),
        (["##", "Ġtitle"], "bpe"),
    ],
)
def test_detect_scheme(tokens: list[str], scheme: str) -> None:
    assert detect_scheme(tokens) == scheme


def test_display_token() -> None:
    assert display_token("Ġcat") == " cat"
    assert display_token("▁dog") == " dog"
    assert display_token("##ing") == "ing"
    assert display_token("Ċ") == "\u21b5"
    assert display_token("ĊĊ") == "\u21b5\u21b5"
    assert display_token("line\n") == "line\u21b5"
    assert display_token("##") == "##"
    assert display_token("[CLS]") == "[CLS]"


def test_aggregate_errors() -> None:
    with pytest.raises(InputError, match="one relevance value per token: got 2 tokens"):
        aggregate_words(["a", "b"], torch.zeros(3))
    with pytest.raises(InputError, match="unknown word scheme 'bytes'"):
        aggregate_words(["a"], torch.zeros(1), scheme="bytes")


def test_aggregate_empty() -> None:
    words, rel = aggregate_words([], torch.zeros(0))
    assert words == [] and rel.shape == (0,)


def test_normalize_max() -> None:
    out = normalize(torch.tensor([2.0, -4.0, 0.0, 1.0]))
    assert out.tolist() == [0.5, -1.0, 0.0, 0.25]
    assert out.abs().max() == 1.0


def test_normalize_sum() -> None:
    assert normalize(torch.tensor([3.0, -1.0, 0.0]), "sum").tolist() == [0.75, -0.25, 0.0]


def test_normalize_none_copies() -> None:
    rel = torch.tensor([3.0, -1.0])
    out = normalize(rel, "none")
    assert out.tolist() == [3.0, -1.0]
    out[0] = 0
    assert rel[0] == 3.0


@pytest.mark.parametrize("method", ["max", "sum", "none"])
def test_normalize_all_zero_stays_zero(method: str) -> None:
    out = normalize(torch.zeros(2, 3), method)
    assert out.shape == (2, 3)
    assert not torch.isnan(out).any() and (out == 0).all()


def test_normalize_integer_input_and_bad_method() -> None:
    assert normalize(torch.tensor([1, -2])).tolist() == [0.5, -1.0]
    with pytest.raises(InputError, match="unknown normalisation 'l2'"):
        normalize(torch.ones(2), "l2")
