"""The explorer in a real headless Chromium: clicks, the layer slider and the head grid change what is shown.

A harness script in the saved page clicks a generated token, moves the layer slider, clicks a head
cell, toggles the query and switches presets, and after each step writes what the page shows (every
token's computed background colour and title, the status line, the selected cells) into the
document; ``--dump-dom`` returns it. Each state is checked against the embedded data, and that data
against the explanations' tensors.
"""

from __future__ import annotations

import json
import math
import re
import sys
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import torch

import lxt_plus
from lxt_plus.render import colors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser import chromium, needs_chromium  # noqa: E402
from families import build, tiny_tokenizer  # noqa: E402

pytestmark = needs_chromium

HARNESS = """<script>(function(){
var root=document.querySelector('.lxt-explorer'),out=[];
function all(c){return Array.prototype.slice.call(root.querySelectorAll(c));}
function snap(name){out.push({name:name,
 bg:all('.lxt-tok').map(function(t){return getComputedStyle(t).backgroundColor;}),
 titles:all('.lxt-tok').map(function(t){return t.title;}),
 cells:all('.lxt-cell').map(function(t){return getComputedStyle(t).backgroundColor;}),
 status:root.querySelector('.lxt-status').textContent,
 legend:root.querySelector('.lxt-hi').textContent,
 target:all('[data-target]').findIndex(function(t){return t.classList.contains('lxt-sel');}),
 cell:all('.lxt-cell').findIndex(function(t){return t.classList.contains('lxt-sel');})});}
function click(el){el.dispatchEvent(new MouseEvent('click',{bubbles:true}));}
function slide(v){var s=root.querySelector('.lxt-layer');s.value=String(v);
 s.dispatchEvent(new Event('input',{bubbles:true}));}
snap('initial');
click(all('[data-target]')[2]);snap('target');
slide(0);snap('layer0');
slide(2);snap('layer2');
click(root.querySelector('.lxt-cell[data-layer="1"][data-head="2"]'));snap('head');
click(root.querySelector('.lxt-q[data-q="k"]'));snap('keys');
click(root.querySelector('.lxt-view[data-view="1"]'));snap('view');
click(root.querySelector('.lxt-input'));snap('input');
var pre=document.createElement('pre');pre.id='harness';pre.textContent=JSON.stringify(out);
document.body.appendChild(pre);})();</script>"""


def _rgb(css: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def _expected(row: dict[str, Any]) -> list[tuple[int, ...]]:
    """The palette colour of each value of an embedded row, computed as the page's script does."""
    bg, _ = colors.palette()
    half = (len(bg) - 1) // 2
    out = []
    for v in row["v"]:
        n = max(-1.0, min(1.0, v / row["lim"])) if row["lim"] > 0 else 0.0
        out.append(_rgb("rgb({},{},{})".format(*bytes.fromhex(bg[math.floor((n + 1) * half + 0.5)][1:]))))
    return out


@pytest.fixture(scope="module")
def explorer() -> lxt_plus.render.explorer.Explorer:
    model = build("llama").float()
    model.generation_config.eos_token_id = None  # always three generated tokens
    return lxt_plus.explore(
        model, "the film was very good", tiny_tokenizer(), presets=("attnlrp", "cp-lrp"), max_new_tokens=3
    )


def _run(tmp_path: Path, explorer: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    page = tmp_path / "explorer.html"
    explorer.save(page)
    html = page.read_text(encoding="utf-8").replace("</body>", HARNESS + "</body>")
    page.write_text(html, encoding="utf-8")
    proc = chromium(
        "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()
    )
    found = re.search(r'<pre id="harness">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the harness wrote nothing (a script failed?): {proc.stderr[-2000:]}"
    data = json.loads(re.search(r'class="lxt-data">(.*?)</script>', html, re.S).group(1))  # type: ignore[union-attr]
    return json.loads(unescape(found.group(1))), data


def test_interactions_show_the_embedded_data(tmp_path: Path, explorer: Any) -> None:
    states, data = _run(tmp_path, explorer)
    by = {s["name"]: s for s in states}
    assert list(by) == ["initial", "target", "layer0", "layer2", "head", "keys", "view", "input"]
    for a, b in zip(states, states[1:], strict=False):
        assert (a["bg"], a["status"]) != (b["bg"], b["status"]), f"{b['name']} changed nothing"

    attn, cp = (v["targets"] for v in data["views"])
    expected = {
        "initial": attn[0]["input"],
        "target": attn[2]["input"],
        "layer0": attn[2]["layers"][0],
        "layer2": attn[2]["layers"][2],
        "head": attn[2]["patq"][1][2],
        "keys": attn[2]["patk"][1][2],
        "view": cp[2]["patk"][1][2],
        "input": cp[2]["input"],
    }
    for name, row in expected.items():
        state = by[name]
        assert [_rgb(c) for c in state["bg"]] == _expected(row), name
        titles = [float(t.split()[-1]) for t in state["titles"]]
        assert titles == pytest.approx(row["v"], rel=1e-5, abs=1e-12), name
        assert state["legend"] == row["hi"], name
    assert any(c != (255, 255, 255) for c in map(_rgb, by["head"]["bg"]))  # a pattern is not blank

    assert by["initial"]["target"] == 0 and by["target"]["target"] == 2 and by["input"]["target"] == 2
    assert "'film' @ position 4" in by["initial"]["status"] and "@ position 6" in by["target"]["status"]
    assert "embeddings" in by["layer0"]["status"] and "output of layer 1" in by["layer2"]["status"]
    assert "head 2 of layer 1" in by["head"]["status"] and "target position" in by["head"]["status"]
    assert "summed over all queries" in by["keys"]["status"]
    assert "cp-lrp" in by["view"]["status"] and "input relevance" in by["input"]["status"]
    # the head grid: the clicked cell is selected (in head mode only) and coloured by that view's heads
    assert by["head"]["cell"] == 1 * 4 + 2 and by["layer2"]["cell"] == -1 and by["input"]["cell"] == -1
    for name, view in (("head", attn), ("view", cp)):
        assert [_rgb(c) for c in by[name]["cells"]] == _expected(view[2]["heads"]), name
    assert by["view"]["cells"] != by["keys"]["cells"]

    # the embedded data is the explanations' tensors
    step = explorer.views["attnlrp"][2]
    n = len(step.tokens[0])
    torch.testing.assert_close(torch.tensor(expected["layer2"]["v"][:n]), step.captures["layers"][0, 2])
    pattern = step.captures["head_patterns"][1][0, 2]  # (seq_q, seq_k) of head 2 in layer 1
    torch.testing.assert_close(torch.tensor(expected["head"]["v"][:n]), pattern[n - 1])
    torch.testing.assert_close(torch.tensor(expected["keys"]["v"][:n]), pattern.sum(0))
