"""The explorer: its embedded data is the explanations' tensors, its text is escaped, bad input is refused."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import lxt_plus
from lxt_plus.api.explore import explore
from lxt_plus.errors import InputError, PresetError, UnsupportedModelError
from lxt_plus.render import explorer as ex
from lxt_plus.render.explorer import Explorer, explorer_html
from lxt_plus.results.result import Explanation, GenerationExplanation, Target

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build, tiny_tokenizer  # noqa: E402

TEXT = "the film was very good"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    m = build("llama").float()
    m.generation_config.eos_token_id = None  # always max_new_tokens tokens
    return m


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def generated(model: torch.nn.Module, tok: Any) -> Explorer:
    return explore(model, TEXT, tok, presets=("attnlrp", "gradient"), max_new_tokens=3)


def _data(page: str) -> dict[str, Any]:
    return json.loads(re.search(r'class="lxt-data">(.*?)</script>', page, re.S).group(1))  # type: ignore[union-attr]


def _close(row: dict[str, Any], tensor: torch.Tensor) -> None:
    torch.testing.assert_close(torch.tensor(row["v"]), tensor.flatten().float(), rtol=1e-5, atol=1e-7)


def test_generated_tokens_embed_their_explanations(generated: Explorer, model: torch.nn.Module) -> None:
    data = _data(generated.to_html())
    assert lxt_plus.explore is explore and [v["name"] for v in data["views"]] == ["attnlrp", "gradient"]
    assert data["nLayers"] == 2 and data["nHeads"] == 4 and len(data["layerNames"]) == 3
    for view in data["views"]:
        steps: Any = generated.views[view["name"]]
        assert len(view["targets"]) == len(steps) == 3
        for target, step in zip(view["targets"], steps, strict=True):
            n, c = len(step.tokens[0]), step.captures
            assert target["desc"] == step.targets[0].describe() and len(target["input"]["v"]) == 5 + 3
            assert target["input"]["v"][n:] == [0.0] * (8 - n)  # columns after the explained position
            _close({"v": target["input"]["v"][:n]}, step.relevance)
            for layer in range(3):
                _close({"v": target["layers"][layer]["v"][:n]}, c["layers"][0, layer])
            _close(target["heads"], c["heads"][0])
            # layer row 0 is the embedding output: the input relevance (Llama has no position embedding)
            _close({"v": target["layers"][0]["v"][:n]}, step.relevance)
            # the last layer's output carries relevance only at the explained (last) position
            assert all(v == 0 for v in target["layers"][2]["v"][: n - 1]) and target["layers"][2]["v"][n - 1]
            assert target["input"]["lim"] == pytest.approx(float(step.relevance.abs().max()), rel=1e-6)
            if view["name"] == "gradient":  # Gradient x Input runs attention unpatched: no head patterns
                assert target["patq"] == [None, None] and target["patk"] == [None, None]
                continue
            for layer in range(2):
                pattern = c["head_patterns"][layer][0]  # (H, q, k)
                for h in range(4):
                    _close({"v": target["patq"][layer][h]["v"][:n]}, pattern[h, n - 1])
                    _close({"v": target["patk"][layer][h]["v"][:n]}, pattern[h].sum(0))
                # a head's pattern sums to the relevance through the head
                sums = torch.tensor([sum(target["patk"][layer][h]["v"]) for h in range(4)])
                torch.testing.assert_close(sums, c["heads"][0, layer], rtol=1e-4, atol=1e-6)


def test_steps_equal_explain_generation(generated: Explorer, model: torch.nn.Module, tok: Any) -> None:
    plain = explore(model, TEXT, tok, max_new_tokens=3, capture=None)
    gen = plain.views["attnlrp"]
    assert isinstance(gen, GenerationExplanation) and repr(plain).startswith("Explorer(presets=['attnlrp']")
    steps = _data(generated.to_html())["views"][0]["targets"]
    for t, target in enumerate(_data(plain.to_html())["views"][0]["targets"]):
        assert target["layers"] is None and target["heads"] is None
        _close(target["input"], gen.matrix[t])
        torch.testing.assert_close(torch.tensor(target["input"]["v"]), torch.tensor(steps[t]["input"]["v"]))
    page = plain.to_html()
    assert 'type="range"' not in page and 'class="lxt-cell"' not in page  # nothing captured: no slider, grid
    assert page.count('data-target="') == 3 and page.count("lxt-gen-tok") >= 3


def test_single_target_with_padding(model: torch.nn.Module) -> None:
    ids = torch.tensor([[5, 17, 33, 8, 61], [4, 9, 21, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    exp = lxt_plus.explain(model, ids, attention_mask=mask, capture=("layers", "heads"))
    page = explorer_html(exp, row=1)
    target = _data(page)["views"][0]["targets"][0]
    _close(target["input"], exp.batch_relevance[1, :3])
    _close(target["layers"][1], exp.captures["layers"][1, 1, :3])
    _close(target["patq"][0][3], exp.captures["head_patterns"][0][1, 3, 2, :3])  # query: last real token
    assert page.count('class="lxt-tok"') == 3 and 'class="lxt-chip lxt-sel" data-target="0"' in page
    assert target["desc"].endswith("@ position 2")


def test_single_explanation_views(model: torch.nn.Module, tok: Any) -> None:
    single = explore(model, TEXT, tok, presets="attnlrp", capture="layers")
    exp = single.views["attnlrp"]
    assert isinstance(exp, Explanation) and "heads" not in exp.captures
    target = _data(single.to_html())["views"][0]["targets"][0]
    assert target["heads"] is None and len(target["layers"]) == 3
    ids = explore(model, torch.tensor([5, 17, 33]), presets=("attnlrp", "cp-lrp"), target=7, capture=())
    assert [t.ids for t in ids.views["cp-lrp"].targets] == [(7,)]  # type: ignore[union-attr]


def _gen(last: str) -> GenerationExplanation:
    matrix = torch.zeros(2, 5)
    matrix[0, :3], matrix[1, :4] = torch.tensor([0.9, -0.3, 0.1]), torch.tensor([0.1, 0.2, -0.8, 1.5])
    return GenerationExplanation(
        tokens=["Once", "Ġupon", "<b>&amp;</b>", "Ġtime", last],
        token_ids=torch.arange(5),
        prompt_length=3,
        matrix=matrix,
        target_logit=torch.tensor([3.0, 2.5]),
        rules="<i>preset</i>",
    )


def test_escaping_and_unique_ids() -> None:
    hostile = "</script><script>alert(1)</script>\u2028"
    page = explorer_html(_gen(hostile))
    assert "<script>alert(1)" not in page and "<b>&amp;</b>" not in page and "<i>preset</i>" not in page
    assert page.count("</script>") == 2  # the data block and the code block, nothing else
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;&amp;amp;" in page
    data = _data(page)
    assert data["views"][0]["targets"][1]["desc"] == f"{hostile!r} @ position 3"  # the JSON keeps the text
    assert data["views"][0]["name"] == "<i>preset</i>"
    assert data["views"][0]["targets"][1]["input"]["v"] == [0.1, 0.2, -0.8, 1.5, 0.0]
    ids = re.findall(r'id="(lxt-explorer-[0-9a-f]+)"', page + explorer_html(_gen("x")))
    assert len(ids) == 2 and ids[0] != ids[1]
    shown = Explorer({"a": _gen("x")})
    assert shown.to_html() != shown.to_html() and shown._repr_html_().startswith('<div class="lxt')


def test_save_writes_a_standalone_page(tmp_path: Path) -> None:
    shown = Explorer({"attnlrp": _gen("Ġdragon")})
    shown.save(tmp_path / "x.html")
    text = (tmp_path / "x.html").read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "lxt-explorer" in text
    assert not re.search(r"(src|href)=", text)  # nothing loaded from outside
    with pytest.raises(InputError, match=r"saved as \.html"):
        shown.save(tmp_path / "x.png")


def test_bad_views_are_refused(model: torch.nn.Module, generated: Explorer) -> None:
    exp = lxt_plus.explain(model, torch.tensor([5, 17, 33]))
    other = lxt_plus.explain(model, torch.tensor([5, 17, 34]))
    with pytest.raises(InputError, match="explain different tokens"):
        explorer_html({"a": exp, "b": other})
    with pytest.raises(InputError, match="explain different tokens"):
        explorer_html({"a": exp, "b": _gen("x")})
    with pytest.raises(InputError, match="expected an Explanation"):
        explorer_html({"a": "text"})  # type: ignore[dict-item]
    with pytest.raises(InputError, match="no views"):
        explorer_html({})
    with pytest.raises(InputError, match="unknown normalisation"):
        explorer_html(exp, normalize="log")
    with pytest.raises(InputError, match="row 3 is out of range"):
        explorer_html(exp, row=3)
    steps = list(generated.views["attnlrp"])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="step 1 does not continue step 0"):
        explorer_html([steps[0], steps[2]])
    pixels = Explanation(
        batch_relevance=torch.zeros(1, 2, 2),
        tokens=[[]],
        token_ids=None,
        attention_mask=None,
        targets=[Target("output", (0,), "0")],
        target_logit=torch.ones(1),
        probability=None,
        rules="attnlrp",
        modality="pixels",
    )
    with pytest.raises(InputError, match="token relevance"):
        explorer_html(pixels)


def test_bad_arguments_are_refused(model: torch.nn.Module, tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="max_new_tokens must be an integer in 0..64"):
        explore(model, TEXT, tok, max_new_tokens=1000)
    with pytest.raises(InputError, match="captures layers, heads"):
        explore(model, TEXT, tok, capture="neurons")
    with pytest.raises(InputError, match="drop target="):
        explore(model, TEXT, tok, max_new_tokens=2, target=5)
    with pytest.raises(InputError, match="each once"):
        explore(model, TEXT, tok, presets=("attnlrp", "attnlrp"))
    with pytest.raises(PresetError):
        explore(model, TEXT, tok, presets=("no-such-preset",))
    with pytest.raises(InputError, match="one text"):
        explore(model, [TEXT, TEXT], tok)  # type: ignore[list-item]
    with pytest.raises(UnsupportedModelError, match="causal LM"):
        explore(build("bert"), torch.tensor([5, 6, 7]), max_new_tokens=2)
    monkeypatch.setattr(ex, "MAX_VALUES", 100)
    with monkeypatch.context() as m:  # a generation that would make too big a page is refused before it runs
        m.setattr(sys.modules["lxt_plus.api.explore"], "generate_greedy", lambda *a: pytest.fail("generated"))
        with pytest.raises(
            InputError, match=r"embed about [\d,]+ values \(at most 100\).*capture=\('layers',\)"
        ):
            explore(model, TEXT, tok, max_new_tokens=8)
    with pytest.raises(InputError, match=r"would embed 108 values \(at most 100\)"):
        explore(model, TEXT, tok)  # 5 tokens + 3 layer rows of 5 + 2 x 4 heads + 2 x 2 x 4 patterns of 5
