"""Self-contained HTML views: a token heatmap and an interactive view of a generation.

Fragments carry their own CSS and script and load nothing from outside; every piece of text is
HTML-escaped and embedded JSON cannot close its ``<script>`` element.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from html import escape
from typing import TYPE_CHECKING

import torch

from lxt_plus.render import colors
from lxt_plus.render._common import (
    conservation_note,
    header_fields,
    legend_labels,
    patch_overlay,
    row_indices,
    row_items,
    row_positions,
)
from lxt_plus.render.summary import generation_summary, segments_summary, summary_line
from lxt_plus.results.images import patch_map
from lxt_plus.results.words import NEWLINE_SYMBOL, display_token
from lxt_plus.results.words import normalize as _normalize

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation, GenerationExplanation
    from lxt_plus.results.segments import Segments
    from lxt_plus.results.similarity import SimilarityExplanation

__all__ = ["explanation_html", "generation_html", "segments_html"]

CSS = """<style>
.lxt{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;color:#1f2328;background:#fff;
 padding:8px 10px;line-height:1.5;max-width:100%}
.lxt-row{margin-bottom:12px}
.lxt-head{font-size:12px;color:#57606a;margin-bottom:4px}
.lxt-head b{color:#1f2328;font-weight:600}
.lxt-tokens{font-size:15px;white-space:pre-wrap;word-wrap:break-word;line-height:1.9}
.lxt-tok{border-radius:3px;padding:1px 0;margin:0 1px}
.lxt-positions{font-size:11px;line-height:1.9;margin-top:2px}
.lxt-pos{border-radius:2px;padding:0 2px;margin:0 1px;font-family:monospace}
.lxt-pos-label{color:#666;margin-right:4px}
.lxt-gen-tok{cursor:pointer;border-bottom:2px dotted #8c959f}
.lxt-sel{outline:2px solid #1f2328;outline-offset:1px}
.lxt-legend{margin-top:6px;font-size:11px;color:#57606a;width:240px}
.lxt-bar{height:12px;border:1px solid #d0d7de;border-radius:2px}
.lxt-labels{display:flex;justify-content:space-between}
.lxt-note{margin-top:4px;font-size:11px;color:#57606a;max-width:640px}
.lxt-summary{margin:2px 0 4px;font-size:12px;color:#1f2328;max-width:640px}
</style>"""


def legend_html(limit: float, ids: bool = False) -> str:
    lo, mid, hi = legend_labels(limit)
    lo_attr, hi_attr = (' class="lxt-lo"', ' class="lxt-hi"') if ids else ("", "")
    return (
        f'<div class="lxt-legend" dir="ltr"><div class="lxt-bar" style="background:{colors.css_gradient()}">'
        f'</div><div class="lxt-labels"><span{lo_attr}>{escape(lo)}</span><span>{mid}</span>'
        f"<span{hi_attr}>{escape(hi)}</span></div></div>"
    )


def _note(exp: Explanation, r: int) -> str:
    return f'<div class="lxt-note">{escape(conservation_note(exp, r))}</div>'


def token_span(text: str, value: float, norm: float, cls: str = "lxt-tok") -> str:
    style = f"background:{colors.hex_color(norm)};color:{colors.text_color(norm)}"
    span = f'<span class="{cls}" style="{style}" title="relevance {value:+.6g}">{escape(text)}</span>'
    return span + ("<br>" if NEWLINE_SYMBOL in text else "")


def _header(fields: list[tuple[str, str]]) -> str:
    return (
        '<div class="lxt-head">'
        + " &middot; ".join(f"{escape(name)} <b>{escape(value)}</b>" for name, value in fields)
        + "</div>"
    )


def _pixels_html(exp: Explanation, r: int, normalize: str) -> str:
    from lxt_plus.render.mpl import plot_explanation

    fig = plot_explanation(exp, row=r, normalize=normalize)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="relevance heatmap" src="data:image/png;base64,{data}">'


def explanation_html(
    exp: Explanation,
    row: int | None = None,
    normalize: str = "max",
    words: bool = False,
    hide_special: bool = False,
) -> str:
    """The explanation as a self-contained HTML fragment.

    Each token is a ``<span>`` coloured by its normalised relevance (red positive, blue negative,
    white zero) whose ``title`` (hover) gives the exact value; a header names the target, preset,
    logit and relevance sum, and a legend maps colours to values.

    Parameters
    ----------
    exp:
        The explanation.
    row:
        Row of a batch to show; ``None`` shows every row.
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``, see :func:`lxt_plus.results.words.normalize`; applied per row.
    words:
        Merge sub-word tokens into words first (relevance summed).
    hide_special:
        Leave out special and chat-template tokens (``exp.hidden``).

    Returns
    -------
    str
        HTML without external resources, safe to embed (all text is escaped).
    """
    parts = [f'<div class="lxt">{CSS}']
    for r in row_indices(exp, row):
        parts.append('<div class="lxt-row">' + _header(header_fields(exp, r)))
        parts.append(
            f'<div class="lxt-summary">{escape(summary_line(exp, r, hide_special=hide_special))}</div>'
        )
        if exp.modality == "pixels":
            parts.append(_pixels_html(exp, r, normalize) + _note(exp, r) + "</div>")
            continue
        texts, rel = row_items(exp, r, words, hide_special)
        norm = _normalize(rel, normalize)
        spans = "".join(token_span(t, float(v), float(n)) for t, v, n in zip(texts, rel, norm, strict=True))
        parts.append(f'<div class="lxt-tokens" dir="auto">{spans}</div>')
        positions = row_positions(exp, r, rel, normalize, words, hide_special)
        if positions is not None:
            parts.append(_positions_html(*positions))
        parts.append(legend_html(colors.color_limit(rel, normalize)) + _row_images_html(exp, r, normalize))
        parts.append(_note(exp, r) + "</div>")
    return "".join(parts) + "</div>"


def _positions_html(positions: torch.Tensor, norm: torch.Tensor) -> str:
    """A strip of position cells under the tokens, in the tokens' colour scale (PA-LRP)."""
    cells = "".join(
        token_span(str(i), float(v), float(n), cls="lxt-pos")
        for i, (v, n) in enumerate(zip(positions, norm, strict=True))
    )
    return f'<div class="lxt-positions" dir="ltr"><span class="lxt-pos-label">positions</span>{cells}</div>'


def safe_json(data: object) -> str:
    """JSON that cannot end a ``<script>`` element or open an HTML comment."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(ch, esc)
    return text


_SCRIPT = """(function(){
var root=document.getElementById(%s);if(!root)return;
var d=JSON.parse(root.querySelector('script.lxt-data').textContent);
var toks=root.querySelectorAll('.lxt-tok');
function fmt(v){return (v>0?'+':'')+Number(v.toPrecision(6));}
function show(t){
 var norm=d.norm[t],raw=d.raw[t],sel=d.start+t;
 for(var i=0;i<toks.length;i++){
  var k=Math.round((Math.max(-1,Math.min(1,norm[i]))+1)*d.half);
  toks[i].style.background=d.bg[k];toks[i].style.color=d.fg[k];
  toks[i].title='relevance '+fmt(raw[i]);
  toks[i].classList.toggle('lxt-sel',i===sel);
 }
 root.querySelector('.lxt-target').textContent=JSON.stringify(d.tokens[sel]);
 root.querySelector('.lxt-logit').textContent=d.logits[t];
 root.querySelector('.lxt-lo').textContent=d.lo[t];
 root.querySelector('.lxt-hi').textContent=d.hi[t];
 root.querySelector('.lxt-summary').textContent=d.summaries[t];
 var img=root.querySelector('.lxt-img');
 if(img&&d.images){img.src=d.images[t];img.title='image relevance '+d.image_sums[t];
  root.querySelector('.lxt-img-sum').textContent=d.image_sums[t];}
}
for(var i=d.start;i<toks.length;i++){(function(t){
 toks[d.start+t].addEventListener('mouseenter',function(){show(t);});
 toks[d.start+t].addEventListener('click',function(){show(t);});
})(i-d.start);}
})();"""


def generation_html(gen: GenerationExplanation, normalize: str = "max") -> str:
    """An interactive HTML view of a generation.

    Shows the prompt and generated tokens; hovering or clicking a generated token colours the sequence
    by that token's row of ``gen.matrix``. The first generated token is shown initially (also without
    JavaScript).

    Parameters
    ----------
    gen:
        The generation explanation.
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``, applied to each row of the matrix.

    Returns
    -------
    str
        A self-contained HTML fragment with a small inline script; token text is escaped and the
        embedded JSON data cannot break out of its ``<script>`` element.
    """
    matrix = gen.matrix.detach().float().cpu()
    texts = [display_token(t) for t in gen.tokens]
    n_gen, start = matrix.shape[0], gen.prompt_length
    norm = torch.stack([_normalize(m, normalize) for m in matrix]) if n_gen else matrix
    limits = [legend_labels(colors.color_limit(m, normalize)) for m in matrix]
    logits = [f"{float(v):.4g}" for v in gen.target_logit]
    bg, fg = colors.palette()
    summaries = [generation_summary(gen, t) for t in range(n_gen)]
    data = {
        "start": start,
        "half": (len(bg) - 1) // 2,
        "bg": bg,
        "fg": fg,
        "tokens": texts,
        "norm": [[round(float(v), 4) for v in row] for row in torch.nan_to_num(norm)],
        "raw": [[float(f"{float(v):.6g}") for v in row] for row in torch.nan_to_num(matrix)],
        "logits": logits,
        "lo": [x[0] for x in limits],
        "hi": [x[2] for x in limits],
        "summaries": summaries,
    }
    uid = f"lxt-gen-{uuid.uuid4().hex[:12]}"
    spans = []
    for i, text in enumerate(texts):
        cls = "lxt-tok" + (" lxt-gen-tok" if i >= start else "") + (" lxt-sel" if i == start else "")
        raw, value = (float(matrix[0, i]), float(norm[0, i])) if n_gen else (0.0, 0.0)
        spans.append(token_span(text, raw, value, cls))
    first = json.dumps(texts[start], ensure_ascii=False) if n_gen else "-"
    head = (
        f'<div class="lxt-head">preset <b>{escape(gen.rules)}</b> &middot; explaining '
        f'<b class="lxt-target">{escape(first)}</b> &middot; logit <b class="lxt-logit">'
        f"{escape(logits[0] if n_gen else '-')}</b> &middot; hover or click a generated "
        f"(underlined) token</div>"
    )
    limit = colors.color_limit(matrix[0], normalize) if n_gen else 1.0
    image = ""
    if gen.image_matrix is not None and gen.pixels is not None and n_gen:
        urls, sums = _image_rows(gen, normalize)
        data["images"], data["image_sums"] = urls, sums
        image = (
            '<div class="lxt-image" style="margin-top:6px">image relevance of the hovered token '
            '(its own colour scale; patches where the model has them): <b class="lxt-img-sum">'
            f'{escape(sums[0])}</b><br><img class="lxt-img" alt="image relevance" '
            f'style="image-rendering:pixelated;width:224px" src="{urls[0]}"></div>'
        )
    return (
        f'<div class="lxt" id="{uid}">{CSS}{head}<div class="lxt-tokens" dir="auto">{"".join(spans)}'
        f"</div>{legend_html(limit, ids=True)}"
        f'<div class="lxt-summary">{escape(summaries[0] if n_gen else "")}</div>{image}'
        f'<script type="application/json" class="lxt-data">{safe_json(data)}</script>'
        f"<script>{_SCRIPT % json.dumps(uid)}</script></div>"
    )


def png_data_url(rgb: torch.Tensor) -> str:
    """``(H, W, 3)`` floats in ``[0, 1]`` as a ``data:image/png`` URL (matplotlib writes the PNG)."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, rgb.clamp(0, 1).numpy(), format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_rows(gen: GenerationExplanation, normalize: str) -> tuple[list[str], list[str]]:
    """One overlay image per generated token (the first image of the prompt, its patch relevance
    where the model has a patch size, each row on its own scale), and each row's image total."""
    assert gen.image_matrix is not None and gen.pixels is not None
    rows = gen.image_matrix[:, 0].float()
    urls = [_overlay_url(gen.pixels[0], rows[t], gen.patch_size, normalize) for t in range(rows.shape[0])]
    return urls, [f"{float(gen.image_matrix[t].sum()):+.4g}" for t in range(rows.shape[0])]


def _overlay_url(
    pixels: torch.Tensor, relevance: torch.Tensor, patch_size: int | None, normalize: str
) -> str:
    """:func:`~lxt_plus.render._common.patch_overlay` as a PNG data URL."""
    return png_data_url(patch_overlay(pixels, relevance, patch_size, normalize))


def _row_images_html(exp: Explanation, r: int, normalize: str) -> str:
    """A vision-language row's images, each overlaid with its pixel relevance, and its total."""
    if exp.images is None:
        return ""
    images = exp.images.of_row(r)
    return "".join(
        '<div class="lxt-image" style="margin-top:6px">image relevance (its own colour scale; patches '
        f"where the model has them): <b>{float(images.relevance[i].sum()):+.4g}</b><br>"
        '<img class="lxt-img" alt="image relevance" style="image-rendering:pixelated;width:224px" '
        f'src="{_overlay_url(images.pixels[i], images.relevance[i], images.patch_size, normalize)}"></div>'
        for i in range(len(images.channels))
    )


def similarity_html(sim: SimilarityExplanation, normalize: str = "max") -> str:
    """A caption-image match: the caption's tokens and the image overlaid with its patch (or
    pixel) relevance, on one colour scale (the larger of the two maxima), with the score and the
    text / image split of the relevance."""
    tokens = [display_token(t) for t in sim.tokens]
    rel = sim.token_relevance.float()
    image = sim.images.relevance[0].float()
    if sim.images.patch_size:
        image = patch_map(image, sim.images.patch_size)
    both = torch.cat([rel.flatten(), image.flatten()])
    limit = colors.color_limit(both, normalize) or 1.0
    spans = "".join(token_span(t, float(v), float(v) / limit) for t, v in zip(tokens, rel, strict=True))
    c = sim.conservation
    head = _header(
        [
            ("similarity", f"{sim.score:.4g}"),
            ("preset", sim.rules),
            ("text", f"{c['text_relevance']:+.4g}"),
            ("image", f"{c['image_relevance']:+.4g}"),
        ]
    )
    url = png_data_url(colors.overlay(sim.images.pixels[0], image, limit))
    picture = f'<img class="lxt-img" alt="image relevance" style="image-rendering:pixelated;width:224px" src="{url}">'
    if sim.pairs is None:
        return (
            f'<div class="lxt">{CSS}{head}<div class="lxt-tokens" dir="auto">{spans}</div>{picture}'
            f"{legend_html(limit)}</div>"
        )
    uid = f"lxt-pairs-{uuid.uuid4().hex[:12]}"
    urls, sums = _pair_images(sim)
    data = {"images": urls, "sums": sums, "tokens": tokens}
    pairs = (
        '<div class="lxt-pairs" style="margin-top:6px">BiLRP: the patches that match the hovered token '
        '(one colour scale for all tokens) <b class="lxt-pair-tok">'
        f"{escape(json.dumps(tokens[0], ensure_ascii=False))} {escape(sums[0])}</b><br>"
        f'<img class="lxt-pair-img" alt="pair relevance" style="image-rendering:pixelated;width:224px" '
        f'src="{urls[0]}"></div>'
    )
    return (
        f'<div class="lxt" id="{uid}">{CSS}{head}<div class="lxt-tokens" dir="auto">{spans}</div>{picture}'
        f"{legend_html(limit)}{pairs}"
        f'<script type="application/json" class="lxt-data">{safe_json(data)}</script>'
        f"<script>{_PAIRS_SCRIPT % json.dumps(uid)}</script></div>"
    )


_PAIRS_SCRIPT = """(function(){
var root=document.getElementById(%s);if(!root)return;
var d=JSON.parse(root.querySelector('script.lxt-data').textContent);
var toks=root.querySelectorAll('.lxt-tok'),img=root.querySelector('.lxt-pair-img');
var label=root.querySelector('.lxt-pair-tok');
function show(t){img.src=d.images[t];label.textContent=JSON.stringify(d.tokens[t])+' '+d.sums[t];}
for(var i=0;i<toks.length;i++){(function(t){
 toks[t].addEventListener('mouseenter',function(){show(t);});
 toks[t].addEventListener('click',function(){show(t);});
})(i);}
})();"""


def _pair_images(sim: SimilarityExplanation) -> tuple[list[str], list[str]]:
    """One overlay per caption token of its BiLRP pair relevance over the image patches, all on
    the scale of the largest pair, and each token's pair total."""
    assert sim.pairs is not None
    pairs = sim.pairs.float()
    size = tuple(sim.images.pixels.shape[-2:])
    limit = float(pairs.abs().max()) or 1.0
    urls, sums = [], []
    for t in range(pairs.shape[-1]):
        grid = torch.nn.functional.interpolate(pairs[None, None, ..., t], size=size, mode="nearest")[0, 0]
        urls.append(png_data_url(colors.overlay(sim.images.pixels[0], grid, limit)))
        sums.append(f"{float(pairs[..., t].sum()):+.4g}")
    return urls, sums


def segments_html(segs: Segments) -> str:
    """Segments as a self-contained HTML fragment: one line per segment, coloured by its relevance
    (normalised by the largest |segment relevance|), with its value and share."""
    values = segs.relevance
    norm = _normalize(values, "max") if len(values) else values
    rows = []
    for seg, n in zip(segs, norm.tolist(), strict=True):
        label = f"{seg.name}: " if seg.name else ""
        text = seg.text if len(seg.text) <= 400 else seg.text[:397] + "..."
        rows.append(
            f'<div class="lxt-seg" style="background:{colors.hex_color(n)};color:{colors.text_color(n)};'
            f'padding:2px 6px;margin:2px 0;border-radius:3px" title="relevance {seg.relevance:+.6g}">'
            f"<b>{seg.relevance:+.3g} ({seg.share:+.0%})</b> {escape(label + text)}</div>"
        )
    limit = float(values.abs().max()) if len(values) else 0.0
    head = _header([("segments by", segs.by), ("count", str(len(segs)))])
    summary = f'<div class="lxt-summary">{escape(segments_summary(segs))}</div>'
    return f'<div class="lxt">{CSS}{head}{summary}{"".join(rows)}{legend_html(limit)}</div>'
