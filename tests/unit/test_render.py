"""Renderers: colours, HTML, terminal, matplotlib, LaTeX and saving by suffix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lxt_plus.errors import InputError
from lxt_plus.render import colors, save_explanation, save_generation
from lxt_plus.render.html import explanation_html, generation_html
from lxt_plus.render.latex import escape_latex, explanation_latex
from lxt_plus.render.terminal import explanation_terminal, generation_terminal
from lxt_plus.results.result import Explanation, GenerationExplanation, Target

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_exp(tokens: list[str] | None = None, relevance: list[float] | None = None) -> Explanation:
    tokens = tokens or ["The", "Ġcat", "Ġsat"]
    rel = torch.tensor([relevance or [0.5, -0.2, 0.0]])
    n = len(tokens)
    return Explanation(
        batch_relevance=rel,
        tokens=[tokens],
        token_ids=torch.arange(1, n + 1)[None],
        attention_mask=torch.ones(1, n, dtype=torch.long),
        targets=[Target(kind="token", ids=(5,), label=" mat", position=2)],
        target_logit=torch.tensor([1.0]),
        probability=torch.tensor([0.3]),
        rules="attnlrp",
    )


def make_batch() -> Explanation:
    return Explanation(
        batch_relevance=torch.tensor([[0.5, -0.2, 0.0, 0.0], [0.1, 0.3, -0.6, 0.2]]),
        tokens=[["The", "Ġcat", "Ġsat", "<pad>"], ["A", "Ġdog", "Ġran", "Ġoff"]],
        token_ids=torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]]),
        attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
        targets=[
            Target(kind="token", ids=(5,), label=" mat", position=2),
            Target(kind="class", ids=(1,), label="positive", contrast_ids=(0,), contrast_label="negative"),
        ],
        target_logit=torch.tensor([1.0, 2.0]),
        probability=torch.tensor([0.3, 0.4]),
        rules="attnlrp",
        single=False,
    )


def make_gen(last_token: str = "Ġdragon") -> GenerationExplanation:
    tokens = ["Once", "Ġupon", "Ġa", "Ġtime", ",", "Ġthere", last_token]
    matrix = torch.zeros(3, 7)
    matrix[0, :4] = torch.tensor([0.9, -0.3, 0.1, 0.2])
    matrix[1, :5] = torch.tensor([0.1, 0.2, -0.8, 0.0, 0.4])
    matrix[2, :6] = torch.tensor([-0.5, 0.0, 0.1, 1.5, 0.0, -0.2])
    return GenerationExplanation(
        tokens=tokens,
        token_ids=torch.arange(7),
        prompt_length=4,
        matrix=matrix,
        target_logit=torch.tensor([3.0, 2.5, 4.0]),
        rules="attnlrp",
    )


# ----------------------------------------------------------------------------------------------- colours
def test_colour_scale() -> None:
    assert colors.rgb(0.0) == (255, 255, 255)
    assert colors.rgb(1.0) == colors.POSITIVE and colors.rgb(-1.0) == colors.NEGATIVE
    assert colors.rgb(5.0) == colors.POSITIVE and colors.rgb(float("nan")) == (255, 255, 255)
    r, g, b = colors.rgb(0.5)
    assert r > g and r > b and g < 255  # half-strength red
    r, g, b = colors.rgb(-0.5)
    assert b > r and b > g
    # intensity grows with |value|
    assert sum(colors.rgb(0.8)) < sum(colors.rgb(0.4)) < sum(colors.rgb(0.1))
    assert colors.hex_color(0.0) == "#ffffff"
    assert colors.text_color(0.0) == "#111111" and colors.text_color(1.0) == "#ffffff"
    bg, fg = colors.palette(half=2)
    assert len(bg) == 5 and bg[2] == "#ffffff" and bg[4] == colors.hex_color(1.0)
    assert colors.css_gradient(3) == (
        f"linear-gradient(to right, {colors.hex_color(-1)}, #ffffff, {colors.hex_color(1)})"
    )


# ------------------------------------------------------------------------------------------------- HTML
def _titles(page: str) -> list[float]:
    return [float(v) for v in re.findall(r'title="relevance ([^"]+)"', page)]


def test_html_tokens_colours_and_header() -> None:
    page = explanation_html(make_exp())
    assert _titles(page) == [0.5, -0.2, 0.0]
    spans = re.findall(
        r'<span class="lxt-tok" style="background:(#[0-9a-f]{6});[^"]*"[^>]*>([^<]*)</span>', page
    )
    assert spans == [(colors.hex_color(1.0), "The"), (colors.hex_color(-0.4), " cat"), ("#ffffff", " sat")]
    assert 'dir="auto"' in page
    assert "&#x27; mat&#x27; @ position 2" in page
    assert "attnlrp" in page and "0.3" in page
    assert "linear-gradient" in page and "-0.5" in page and "+0.5" in page  # legend with min/max labels
    assert "<script" not in page and "http" not in page  # self-contained, no script needed


def test_html_escapes_token_text() -> None:
    page = explanation_html(make_exp(["<script>alert(1)</script>", "Ġ&", 'Ġ"x"']))
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert " &amp;" in page and "&quot;x&quot;" in page


def test_html_escapes_target_label() -> None:
    exp = make_exp()
    exp.targets[0] = Target(kind="class", ids=(1,), label="<b>bold</b>")
    page = explanation_html(exp)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_html_batch_and_row() -> None:
    exp = make_batch()
    page = explanation_html(exp)
    assert page.count('class="lxt-row"') == 2
    assert _titles(page) == pytest.approx([0.5, -0.2, 0.0, 0.1, 0.3, -0.6, 0.2])  # padding dropped
    assert "&lt;pad&gt;" not in page
    one = explanation_html(exp, row=1)
    assert one.count('class="lxt-row"') == 1 and _titles(one) == pytest.approx([0.1, 0.3, -0.6, 0.2])
    assert "negative" in one  # contrastive target in the header
    with pytest.raises(InputError, match="row 2 is out of range"):
        explanation_html(exp, row=2)


def test_html_words_and_normalisation() -> None:
    exp = make_exp(["The", "Ġc", "at"], [0.2, 0.3, 0.5])
    page = explanation_html(exp, words=True)
    assert _titles(page) == pytest.approx([0.2, 0.8])
    assert ">The<" in page and "> cat<" in page
    summed = explanation_html(exp, normalize="sum")
    assert f"background:{colors.hex_color(0.5)}" in summed  # 0.5 / (0.2 + 0.3 + 0.5)


def test_generation_html_is_interactive_and_escaped() -> None:
    page = generation_html(make_gen("</script><script>alert(1)</script>"))
    assert "<script>alert(1)" not in page
    assert page.count("</script>") == 2  # the data block and the code block, nothing else
    data = json.loads(re.search(r'class="lxt-data">(.*?)</script>', page, re.S).group(1))
    assert data["start"] == 4 and len(data["norm"]) == 3
    assert data["tokens"][-1] == "</script><script>alert(1)</script>"
    assert data["raw"][2][3] == 1.5 and data["norm"][2][3] == 1.0
    assert page.count("lxt-gen-tok") >= 3 and "mouseenter" in page and "click" in page
    assert "linear-gradient" in page
    # the first generated token's row is shown without JavaScript, with its sentence
    assert _titles(page)[:4] == pytest.approx([0.9, -0.3, 0.1, 0.2])
    first = "Pushing &#x27;,&#x27; up (red): Once (+0.9), time (+0.2), a (+0.1); pushing it down (blue): upon (-0.3)"
    assert f'<div class="lxt-summary">{first}' in page
    assert data["summaries"][2].startswith(
        "Pushing '</script><script>alert(1)</script>' up (red): time (+1.5)"
    )


# --------------------------------------------------------------------------------------------- terminal
def test_terminal_has_colours_and_tokens() -> None:
    out = explanation_terminal(make_exp(), width=80)
    assert "\x1b[" in out
    assert "48;2;{};{};{}".format(*colors.rgb(1.0)) in out  # background of the strongest token
    assert "48;2;{};{};{}".format(*colors.rgb(-0.4)) in out
    plain = ANSI.sub("", out)
    assert "The cat sat" in plain
    assert "' mat' @ position 2" in plain and "attnlrp" in plain and "logit 1" in plain
    assert "-0.5" in plain and "+0.5" in plain


def test_terminal_batch_words_and_markup_safety() -> None:
    plain = ANSI.sub("", explanation_terminal(make_batch(), width=80))
    assert "The cat sat" in plain and "A dog ran off" in plain and "<pad>" not in plain
    plain = ANSI.sub("", explanation_terminal(make_exp(["[bold]x[/bold]", "Ġc", "at"]), words=True, width=80))
    assert "[bold]x[/bold] cat" in plain


def test_generation_terminal_top_sources() -> None:
    plain = ANSI.sub("", generation_terminal(make_gen(), k=2, width=400, color=False))
    lines = plain.strip().splitlines()
    assert len(lines) == 7  # header, then per generated token its sources and its sentence
    assert lines[1].startswith("','") and "Once +0.9" in lines[1] and "upon -0.3" in lines[1]
    assert lines[5].startswith("' dragon'") and "time +1.5" in lines[5] and "Once -0.5" in lines[5]
    assert "a " not in lines[5].split("<-")[1]  # only the top 2
    assert lines[6].strip() == (
        "Pushing ' dragon' up (+): time (+1.5), a (+0.1); pushing it down (-): Once (-0.5), there (-0.2). "
        "The tokens for it carry +1.6 and those against it -0.7 of the explained logit 4."
    )
    assert lines[4].strip().startswith("Pushing ' there' up (+): , (+0.4), upon (+0.2)")


# ------------------------------------------------------------------------------------------- matplotlib
def test_plot_modalities() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    assert isinstance(make_exp().plot(), Figure)
    assert len(make_batch().plot().axes) == 2
    pix = Explanation(
        batch_relevance=torch.randn(1, 6, 5),
        tokens=[[]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="output", ids=(3,), label="3")],
        target_logit=torch.tensor([2.0]),
        probability=None,
        rules="epsilon",
        modality="pixels",
    )
    fig = pix.plot()
    image = fig.axes[0].images[0]
    lo, hi = image.get_clim()
    assert lo == -hi and image.get_cmap().name == "lxt_plus"  # the token scale


def test_pixel_heatmap_over_the_image() -> None:
    """With the input pixels kept, the heatmap tints the image: zero relevance leaves its grey
    level, full positive relevance is the token scale's red, full negative its blue."""
    pytest.importorskip("matplotlib")
    from lxt_plus.render import colors
    from lxt_plus.results.images import ImageRelevance

    pixels = torch.linspace(-1, 1, 12).reshape(1, 1, 3, 4)
    rel = torch.zeros(1, 3, 4)
    rel[0, 0, 0], rel[0, 2, 3] = 2.0, -2.0
    pix = Explanation(
        batch_relevance=rel,
        tokens=[[]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="class", ids=(1,), label="1")],
        target_logit=torch.tensor([0.0]),
        probability=None,
        rules="attnlrp",
        modality="pixels",
        images=ImageRelevance(rel[:, None], pixels, patch_size=2),
    )
    shown = torch.tensor(pix.plot().axes[0].images[0].get_array())
    assert shown.shape == (3, 4, 3)
    grey = (pixels[0, 0] + 1) / 2
    torch.testing.assert_close(shown[1, 1], (0.25 + 0.75 * grey[1, 1]).repeat(3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shown[0, 0], torch.tensor(colors.POSITIVE, dtype=torch.float32) / 255)
    torch.testing.assert_close(shown[2, 3], torch.tensor(colors.NEGATIVE, dtype=torch.float32) / 255)
    plain = torch.tensor(pix.plot(overlay=False).axes[0].images[0].get_array())
    assert plain.shape == (3, 4)
    assert pix.patch_relevance().shape == (2, 2) and float(pix.patch_relevance()[0, 0]) == 2.0
    feat = Explanation(
        batch_relevance=torch.tensor([[0.4, -0.3]]),
        tokens=[["age", "income"]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="output", ids=(0,), label="y")],
        target_logit=torch.tensor([0.1]),
        probability=None,
        rules="epsilon",
        modality="features",
    )
    bars = feat.plot().axes[0].patches
    assert [b.get_width() for b in bars] == pytest.approx([1.0, -0.75])
    gen_fig = make_gen().plot()
    assert [t.get_text() for t in gen_fig.axes[0].get_yticklabels()] == [",", "there", "dragon"]
    lo, hi = gen_fig.axes[0].images[0].get_clim()
    assert (lo, hi) == (-1.5, 1.5)


def test_plot_into_given_axes() -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.subplots()
    assert make_exp().plot(ax=ax) is fig
    with pytest.raises(InputError, match="pass row="):
        make_batch().plot(ax=ax)


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_save_images(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    save_explanation(make_exp(), tmp_path / f"exp{suffix}")
    save_generation(make_gen(), tmp_path / f"gen{suffix}")
    for name in ("exp", "gen"):
        assert (tmp_path / f"{name}{suffix}").stat().st_size > 1000


def test_save_text_formats(tmp_path: Path) -> None:
    exp = make_exp()
    exp.save(str(tmp_path / "e.html"))
    exp.save(str(tmp_path / "e.json"))
    exp.save(str(tmp_path / "e.tex"))
    make_gen().save(str(tmp_path / "g.html"))
    make_gen().save(str(tmp_path / "g.json"))
    page = (tmp_path / "e.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and 'charset="utf-8"' in page and "lxt-tok" in page
    assert json.loads((tmp_path / "e.json").read_text())["tokens"] == [["The", "Ġcat", "Ġsat"]]
    assert "\\colorbox" in (tmp_path / "e.tex").read_text()
    assert "mouseenter" in (tmp_path / "g.html").read_text()
    assert json.loads((tmp_path / "g.json").read_text())["prompt_length"] == 4


def test_save_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(
        InputError, match=r"unknown suffix '\.docx'.*\.png, \.pdf, \.svg, \.html, \.json, \.tex"
    ):
        save_explanation(make_exp(), tmp_path / "e.docx")
    with pytest.raises(InputError, match=r"use one of \.png, \.pdf, \.svg, \.html, \.json$"):
        save_generation(make_gen(), tmp_path / "g.tex")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ LaTeX
def test_escape_latex() -> None:
    assert escape_latex(r"\ & % $ # _ { } ~ ^") == (
        r"\textbackslash{} \& \% \$ \# \_ \{ \} \textasciitilde{} \textasciicircum{}"
    )


def test_latex_snippet() -> None:
    tex = explanation_latex(make_exp(["50%", "Ġ$x_1", "Ġ#{a}"], [1.0, -0.5, 0.0]))
    assert tex.startswith("%") and "\\usepackage{xcolor}" in tex.splitlines()[0]
    r, g, b = colors.rgb(1.0)
    assert f"\\colorbox[RGB]{{{r},{g},{b}}}{{\\strut \\textcolor{{white}}{{50\\%}}}}" in tex
    r, g, b = colors.rgb(-0.5)
    assert f"\\colorbox[RGB]{{{r},{g},{b}}}{{\\strut \\$x\\_1}}" in tex
    assert "\\colorbox[RGB]{255,255,255}{\\strut \\#\\{a\\}}" in tex
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert not any(re.search(r"(?<!\\)[%$#_]", line.replace("}%", "}")) for line in body)


def test_latex_pixels_rejected() -> None:
    pix = Explanation(
        batch_relevance=torch.zeros(1, 2, 2),
        tokens=[[]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="output", ids=(0,), label="0")],
        target_logit=torch.tensor([0.0]),
        probability=None,
        rules="epsilon",
        modality="pixels",
    )
    with pytest.raises(InputError, match="save it as .png"):
        explanation_latex(pix)


def test_hide_special_tokens() -> None:
    exp = make_exp(["<|im_start|>", "Hi", "Ġthere"], [0.1, 0.5, -0.25])
    exp.hidden = torch.tensor([[True, False, False]])
    assert "im_start" in explanation_html(exp)
    page = explanation_html(exp, hide_special=True)
    assert "im_start" not in page and _titles(page) == [0.5, -0.25]
    assert "im_start" not in ANSI.sub("", explanation_terminal(exp, hide_special=True, width=80))
    assert "im" not in explanation_latex(exp, words=True, hide_special=True).split("\n", 2)[2]


# ------------------------------------------------------------------------------------- conservation
def test_conservation_explains_what_is_absorbed() -> None:
    exp = make_exp()  # relevance sum 0.3 of a logit 1.0 under attnlrp
    cons = exp.conservation
    assert isinstance(cons, dict) and set(cons) == {
        "relevance_sum",
        "position_relevance",
        "target_logit",
        "absorbed",
    }
    assert float(cons["absorbed"]) == pytest.approx(0.7)
    text = repr(cons)
    assert text.startswith(
        "Conservation(relevance_sum=0.3, position_relevance=None, target_logit=1, absorbed=0.7)"
    )
    assert "not a leak" in text and "softmax's bias term" in text and "conservative-check" in text
    assert "0.7 absorbed by biases and the softmax, not a leak" in repr(exp)
    html = explanation_html(exp)
    assert "the other 0.7 went to biases and the softmax&#x27;s bias term (AttnLRP)" in html
    assert "conservative-check preset (biases zeroed) conserves exactly" in html
    exact = make_exp()
    exact.rules = "conservative-check"
    assert "float error" in repr(exact.conservation) and "conserved up to float error" in explanation_html(
        exact
    )


def test_summary_says_what_pushed_up_and_down() -> None:
    exp = make_exp(["The", "Ġcat", "Ġsat", "Ġon", "Ġthe"], [0.5, -0.2, 0.9, 0.0, -0.7])
    text = exp.summary(k=2)
    up, down = text.split("; pushing it down")
    assert up == "Pushing ' mat' up (red): sat (+0.9), The (+0.5)"
    assert down.startswith(" (blue): the (-0.7), cat (-0.2).")
    assert "carry +1.4 and those against it -0.9 of the explained logit 1." in text
    plain = summary_plain(exp)  # without colours the sentence names the signs
    assert (
        plain.startswith("Pushing ' mat' up (+): sat (+0.9)") and "pushing it down (-): the (-0.7)" in plain
    )
    figure_text = " ".join(t.get_text() for a in exp.plot().axes for t in a.texts).replace("\n", " ")
    for rendered in (exp.to_html(), exp.to_terminal(color=False), exp.to_latex(), figure_text):
        assert "Pushing" in rendered and "sat (+0.9)" in rendered
    nothing = make_exp(["a", "Ġb"], [0.3, 0.0]).summary()
    assert "nothing pushes it down" in nothing
    from lxt_plus.errors import InputError

    with pytest.raises(InputError, match="out of range"):
        exp.summary(row=3)


def summary_plain(exp: Explanation) -> str:
    from lxt_plus.render.summary import summary_line

    return summary_line(exp, 0, colored=False)


def test_summary_of_pixels_names_patches() -> None:
    from lxt_plus.results.images import ImageRelevance

    rel = torch.zeros(1, 4, 4)
    rel[0, 0, 2] = 1.0  # top-right patch of 2x2
    rel[0, 3, 0] = -0.5  # bottom-left patch
    pix = Explanation(
        batch_relevance=rel,
        tokens=[[]],
        token_ids=None,
        attention_mask=None,
        targets=[Target(kind="class", ids=(7,), label="7")],
        target_logit=torch.tensor([0.5]),
        probability=None,
        rules="attnlrp",
        modality="pixels",
        images=ImageRelevance(rel[:, None], torch.zeros(1, 1, 4, 4), patch_size=2),
    )
    text = pix.summary()
    assert text.startswith("Pushing '7' up (red): patch at row 0, column 1 (+1)")
    assert "pushing it down (blue): patch at row 1, column 0 (-0.5)" in text
