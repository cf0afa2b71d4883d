"""The HTML views in a real headless Chromium: what a person sees, and the hover script."""

from __future__ import annotations

import base64
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lxt_plus.results.result import Explanation, GenerationExplanation, Target

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from browser import chromium as _chromium  # noqa: E402
from browser import needs_chromium  # noqa: E402

pytestmark = needs_chromium


def _page(path: Path, fragment: str, extra: str = "") -> str:
    path.write_text(
        f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:8px">'
        f"{fragment}{extra}</body></html>",
        encoding="utf-8",
    )
    return path.as_uri()


def _screenshot(tmp_path: Path, fragment: str) -> np.ndarray:
    png = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={png}", "--window-size=800,400", _page(tmp_path / "page.html", fragment))
    assert png.exists(), f"chromium made no screenshot: {proc.stderr[-2000:]}"
    from matplotlib.image import imread

    img = imread(png)
    return (img[..., :3] * 255).round().astype(int) if img.dtype.kind == "f" else img[..., :3].astype(int)


def _legend_rows(img: np.ndarray) -> list[int]:
    """Rows crossed by a smooth run (small steps) going from strong blue to strong red: a gradient."""
    rows = []
    for y in range(img.shape[0]):
        line = img[y]
        step = np.abs(np.diff(line, axis=0)).max(axis=1)
        redness = line[:, 0] - line[:, 2]
        start = 0
        for x in np.append(np.flatnonzero(step > 12), len(line) - 1):
            run = redness[start : x + 1]
            if len(run) > 100 and run[:10].max() < -100 and run[-10:].min() > 100:
                inner = run[10:-10]
                assert (np.diff(inner) >= -3).all(), f"legend row {y} is not monotone from blue to red"
                assert len(np.unique(line[start : x + 1], axis=0)) > 40, "legend row is not a gradient"
                rows.append(y)
            start = x + 1
    return rows


def test_heatmap_screenshot(tmp_path: Path) -> None:
    tokens = ["The", "Ġfilm", "Ġwas", "Ġwonderful", "Ġbut", "Ġboring", "."]
    rel = torch.tensor([[0.05, 0.1, 0.0, 1.0, -0.1, -0.9, 0.0]])
    exp = Explanation(
        batch_relevance=rel,
        tokens=[tokens],
        token_ids=torch.arange(7)[None],
        attention_mask=torch.ones(1, 7, dtype=torch.long),
        targets=[Target(kind="class", ids=(1,), label="positive")],
        target_logit=torch.tensor([2.0]),
        probability=torch.tensor([0.8]),
        rules="attnlrp",
    )
    img = _screenshot(tmp_path, exp.to_html())

    legend = _legend_rows(img)
    assert len(legend) >= 5, "no colour gradient legend found in the screenshot"
    above = img[: min(legend) - 2]
    r, g, b = above[..., 0], above[..., 1], above[..., 2]
    reddish = (r - np.maximum(g, b) > 100).sum()
    bluish = (b - np.maximum(r, g) > 80).sum()
    assert reddish > 200, f"no red token box ({reddish} reddish pixels)"
    assert bluish > 200, f"no blue token box ({bluish} bluish pixels)"
    # red and blue tokens sit side by side on the token line, red ("wonderful") left of blue ("boring")
    red_x = np.flatnonzero((r - np.maximum(g, b) > 100).any(axis=0))
    blue_x = np.flatnonzero((b - np.maximum(r, g) > 80).any(axis=0))
    assert red_x.mean() < blue_x.mean()


def test_generation_hover_recolours(tmp_path: Path) -> None:
    tokens = ["Once", "Ġupon", "Ġa", "Ġtime", ",", "Ġthere", "</script><b>x</b>"]
    matrix = torch.zeros(3, 7)
    matrix[0, :4] = torch.tensor([0.9, -0.3, 0.1, 0.2])
    matrix[2, :6] = torch.tensor([-0.5, 0.0, 0.1, 1.5, 0.0, -0.2])
    gen = GenerationExplanation(
        tokens=tokens,
        token_ids=torch.arange(7),
        prompt_length=4,
        matrix=matrix,
        target_logit=torch.tensor([3.0, 2.5, 4.0]),
        rules="attnlrp",
    )
    hover = (
        "<script>var t=document.querySelectorAll('.lxt-gen-tok');"
        "t[t.length-1].dispatchEvent(new Event('mouseenter'));</script>"
    )
    proc = _chromium("--dump-dom", _page(tmp_path / "gen.html", gen.to_html(), hover))
    dom = proc.stdout
    assert "lxt-tok" in dom, f"chromium returned no DOM: {proc.stderr[-2000:]}"
    assert "<b>x</b>" not in dom  # the token stayed text
    spans = re.findall(r'<span class="([^"]*)" style="([^"]*)" title="relevance ([^"]*)">', dom)
    assert len(spans) == 7
    assert [float(t) for _, _, t in spans] == pytest.approx([-0.5, 0, 0.1, 1.5, 0, -0.2, 0])  # row 3 now
    assert "lxt-sel" in spans[-1][0] and "lxt-sel" not in spans[4][0]
    assert "rgb(215, 25, 28)" in spans[3][1] or "#d7191c" in spans[3][1]  # strongest positive: full red
    assert "+1.5" in dom and "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in dom
    summary = re.search(r'<div class="lxt-summary">([^<]*)</div>', dom).group(1)  # the hovered token's
    assert summary.startswith("Pushing '&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;' up (red): time (+1.5)")


def test_generation_hover_shows_the_image_relevance(tmp_path: Path) -> None:
    """A vision-language generation: hovering a generated token swaps in that token's image heatmap."""
    pixels = torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4)
    image_matrix = torch.zeros(2, 1, 4, 4)
    image_matrix[0, 0, :2, :2] = 1.0  # token 0: the top-left patch
    image_matrix[1, 0, 2:, 2:] = -1.0  # token 1: the bottom-right patch, against
    gen = GenerationExplanation(
        tokens=["<image>", "Ġa", "Ġcat", "Ġsits"],
        token_ids=torch.arange(4),
        prompt_length=2,
        matrix=torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.2, 0.7, 0.0]]),
        target_logit=torch.tensor([1.0, 2.0]),
        rules="attnlrp",
        image_matrix=image_matrix,
        pixels=pixels,
        patch_size=2,
    )
    html = gen.to_html()
    urls = re.findall(r'"(data:image/png;base64,[^"]+)"', html)
    assert len(set(urls)) == 2  # one heatmap per generated token
    hover = (
        "<script>var t=document.querySelectorAll('.lxt-gen-tok');"
        "t[t.length-1].dispatchEvent(new Event('mouseenter'));</script>"
    )
    dom = _chromium("--dump-dom", _page(tmp_path / "vlm.html", html, hover)).stdout
    src = re.search(r'<img class="lxt-img"[^>]*src="([^"]+)"', dom)
    initial = re.search(r'<img class="lxt-img"[^>]*src="([^"]+)"', html)
    assert src is not None and initial is not None
    assert src.group(1) in urls and src.group(1) != initial.group(1)  # swapped to the hovered token's
    shown = re.search(r'class="lxt-img-sum">([^<]*)<', dom)
    assert shown is not None and shown.group(1) == "-4"  # the hovered token's image total

    from matplotlib.image import imread

    def decode(url: str) -> np.ndarray:
        return imread(io.BytesIO(base64.b64decode(url.split(",", 1)[1])), format="png")[..., :3]

    after = decode(src.group(1))
    assert after[3, 3, 2] > after[3, 3, 0] + 0.3  # bottom-right tinted blue for the second token
    assert abs(after[0, 0, 0] - after[0, 0, 2]) < 0.05  # top-left untinted


def test_similarity_pairs_hover_shows_the_token_patches(tmp_path: Path) -> None:
    """BiLRP's pair view: hovering a caption token swaps in the patches that match it."""
    from lxt_plus.results.images import ImageRelevance
    from lxt_plus.results.similarity import SimilarityExplanation

    pixels = torch.linspace(-1, 1, 3 * 4 * 4).reshape(1, 3, 4, 4)
    pairs = torch.zeros(2, 2, 3)
    pairs[0, 0, 1] = 2.0  # "Ġcat": the top-left patch
    pairs[1, 1, 2] = -1.0  # "Ġsits": the bottom-right patch, against
    sim = SimilarityExplanation(
        score=1.0,
        tokens=["<s>", "Ġcat", "Ġsits"],
        token_relevance=torch.tensor([0.0, 0.6, 0.2]),
        images=ImageRelevance(torch.zeros(1, 3, 4, 4), pixels, patch_size=2),
        position_relevance=0.0,
        rules="attnlrp",
        pairs=pairs,
    )
    html = sim.to_html()
    urls = re.findall(r'"(data:image/png;base64,[^"]+)"', html)
    assert len(set(urls)) == 3  # one pair map per token
    hover = "<script>var t=document.querySelectorAll('.lxt-tok');t[2].dispatchEvent(new Event('mouseenter'));</script>"
    dom = _chromium("--dump-dom", _page(tmp_path / "pairs.html", html, hover)).stdout
    src = re.search(r'<img class="lxt-pair-img"[^>]*src="([^"]+)"', dom)
    initial = re.search(r'<img class="lxt-pair-img"[^>]*src="([^"]+)"', html)
    assert src is not None and initial is not None and src.group(1) != initial.group(1)
    label = re.search(r'class="lxt-pair-tok">([^<]*)<', dom)
    assert label is not None and label.group(1) == '" sits" -1'

    from matplotlib.image import imread

    after = imread(io.BytesIO(base64.b64decode(src.group(1).split(",", 1)[1])), format="png")[..., :3]
    assert after[3, 3, 2] > after[3, 3, 0] + 0.2  # bottom-right tinted blue: against the match
    assert abs(after[0, 0, 0] - after[0, 0, 2]) < 0.05  # top-left untinted for this token


def test_summary_matches_the_colours_on_screen(tmp_path: Path) -> None:
    """What the sentence says is red is red in the page, what it says is blue is blue."""
    exp = Explanation(
        batch_relevance=torch.tensor([[0.1, 0.9, -0.6, 0.05]]),
        tokens=[["The", "Ġfilm", "Ġwas", "Ġboring"]],
        token_ids=torch.arange(4)[None],
        attention_mask=torch.ones(1, 4, dtype=torch.long),
        targets=[Target(kind="class", ids=(1,), label="POSITIVE")],
        target_logit=torch.tensor([0.45]),
        probability=torch.tensor([0.6]),
        rules="attnlrp",
    )
    dom = _chromium("--dump-dom", _page(tmp_path / "summary.html", exp.to_html())).stdout
    summary = re.search(r'<div class="lxt-summary">([^<]*)</div>', dom)
    assert summary is not None
    sentence = summary.group(1)
    first_up = sentence.split("up (red): ")[1].split(" (")[0]
    first_down = sentence.split("down (blue): ")[1].split(" (")[0]
    spans = dict(
        (text.strip(), style)
        for style, text in re.findall(r'<span class="lxt-tok" style="([^"]*)"[^>]*>([^<]*)</span>', dom)
    )
    red = spans[first_up]
    blue = spans[first_down]
    assert first_up == "film" and first_down == "was"
    assert "#d7191c" in red or "rgb(215, 25, 28)" in red  # the strongest positive: full red
    assert re.search(r"background:#([0-9a-f]{2})([0-9a-f]{2})([0-9a-f]{2})", blue) is not None
    r, g, b = (int(x, 16) for x in re.search(r"background:#(..)(..)(..)", blue).groups())  # type: ignore[union-attr]
    assert b > r + 40  # blue
