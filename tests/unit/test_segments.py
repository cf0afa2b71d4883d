"""Relevance by segment: sentence and paragraph splits, user spans and passages, the rest segment,
rankings, and the HTML and terminal views."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain  # noqa: E402
from lxt_plus.errors import InputError  # noqa: E402
from lxt_plus.results.segments import segment_tokens  # noqa: E402

# byte-level BPE pieces: two sentences, a blank line, a third sentence
TOKENS = ["The", "Ġdoor", "Ġis", "Ġred", ".", "ĠIt", "Ġopens", "!", "ĊĊ", "Code", ":", "Ġ48", "21", "."]
REL = torch.arange(1.0, len(TOKENS) + 1)


def test_sentences_and_paragraphs() -> None:
    sents = segment_tokens(TOKENS, REL, by="sentence")
    assert [(s.start, s.end) for s in sents] == [(0, 5), (5, 9), (9, 14)]  # "ĊĊ" stays with "It opens!"
    assert [s.text for s in sents] == ["The door is red.", "It opens!", "Code: 4821."]
    assert sents.relevance.tolist() == [15.0, 30.0, 60.0]
    assert sum(s.share for s in sents) == pytest.approx(1.0)
    paras = segment_tokens(TOKENS, REL, by="paragraph")
    assert [(s.start, s.end) for s in paras] == [(0, 9), (9, 14)]
    assert paras.top(1)[0].text == "Code: 4821."
    tokens = segment_tokens(TOKENS, REL, by="token")
    assert len(tokens) == len(TOKENS) and tokens.relevance.tolist() == REL.tolist()


def test_passages_and_spans_with_the_rest() -> None:
    segs = segment_tokens(TOKENS, REL, passages=["door is red", "Code: 4821"], names=["a", "b"])
    assert [(s.name, s.start, s.end) for s in segs] == [("a", 1, 4), ("b", 9, 13), ("(other)", -1, -1)]
    assert segs.other is not None and segs.other.relevance == float(REL.sum()) - 9.0 - 46.0
    assert [s.name for s in segs.ranked()] == ["b", "a"]  # the rest is not a passage
    spans = segment_tokens(TOKENS, REL, spans=[(0, 5), (5, 14)])
    assert spans.other is None and spans.relevance.tolist() == [15.0, 90.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"passages": ["not there"]}, "is not in the explained text"),
        ({"spans": [(3, 3)]}, "is not a token range"),
        ({"spans": [(0, 99)]}, "is not a token range"),
        ({"spans": [(0, 2)], "passages": ["The"]}, "not both"),
        ({"spans": [(0, 2)], "names": ["a", "b"]}, "2 names for 1 spans"),
        ({"by": "word"}, "use one of sentence, paragraph, token"),
    ],
)
def test_bad_segments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        segment_tokens(TOKENS, REL, **kwargs)  # type: ignore[arg-type]


def test_views_show_every_segment() -> None:
    segs = segment_tokens(TOKENS, REL, passages=["door is red", "Code: 4821"], names=["a", "b"])
    html = segs.to_html()
    assert html.count('class="lxt-seg"') == 3 and "a: door is red" in html and "+46 (+44%)" in html
    text = segs.to_terminal(color=False, width=80)
    assert "\x1b" not in text and re.search(r"\+46\s+\+44%\s+b: Code: 4821", text)
    assert "\x1b[" in segs.to_terminal(color=True, width=80)
    assert segs.to_dict()["segments"][1]["name"] == "b"
    # the plain-language sentence: which segments pushed the prediction, and what each side carries
    sentence = "Pushing the prediction up (red): (other) (+50), b (+46), a (+9); nothing pushes it down."
    assert sentence in html
    plain = " ".join(segs.to_terminal(color=False, width=300).split())
    assert "Pushing the prediction up (+): (other) (+50), b (+46), a (+9)" in plain
    assert "The segments for it carry +105 and those against it +0." in plain


def test_explanation_segments_sum_to_the_relevance() -> None:
    model = build("llama")
    ids = torch.tensor([[5, 9, 14, 3, 22, 41, 7, 8]])
    exp = explain(model, ids)
    segs = exp.segments(spans=[(0, 3), (3, 6)])
    assert sum(s.relevance for s in segs) == pytest.approx(float(exp.relevance.sum()), rel=1e-6)
    assert segs[0].relevance == pytest.approx(float(exp.relevance.reshape(-1)[:3].sum()), rel=1e-6)
