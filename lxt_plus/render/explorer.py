"""An interactive explorer: presets, targets, layers and heads of one text in one self-contained HTML view.

Click a target (a generated token, or the one explained target) to see its heatmap over the input
tokens; switch between presets; scrub the residual stream layer by layer (``captures["layers"]``);
click a cell of the layer x head grid (``captures["heads"]``) to see that head's relevance-weighted
attention pattern (``captures["head_patterns"]``) over the key tokens. Everything shown is
computed in Python and embedded as JSON; a small inline script only picks what to show. The page
loads nothing, needs no server, and works in Jupyter, VS Code and a saved ``.html`` file (without
JavaScript it shows the first target's input relevance).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from html import escape
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import Tensor

from lxt_plus.errors import InputError
from lxt_plus.render import colors
from lxt_plus.render._common import legend_labels, row_indices, row_items
from lxt_plus.render.html import CSS, legend_html, safe_json, token_span
from lxt_plus.results.result import Explanation, GenerationExplanation, Target
from lxt_plus.results.words import display_token
from lxt_plus.results.words import normalize as _normalize

__all__ = ["Explorer", "explorer_html", "MAX_NEW_TOKENS", "MAX_VALUES", "CAPTURES"]

Result: TypeAlias = Explanation | GenerationExplanation | Sequence[Explanation]
"""One view: an explanation, a generation explanation, or the steps of a generation (one explanation
per generated token, with captures)."""

CAPTURES = ("layers", "heads")
MAX_NEW_TOKENS = 64  # one explain() per generated token and preset when layers or heads are captured
MAX_VALUES = 1_000_000  # numbers embedded in one page (about 8 MB of HTML)


# ----------------------------------------------------------------------------------------- data
@dataclass
class _Target:
    """What the page shows for one target of one view; every tensor is over the ``n`` shown tokens."""

    desc: str
    logit: float
    slot: int | None  # index of the token that is the target (generation); None: shown after the text
    query: int | None  # index of the token whose logits were explained
    input: Tensor  # (n,)
    layers: Tensor | None = None  # (L + 1, n)
    heads: Tensor | None = None  # (L, H)
    pattern_query: list[Tensor | None] | None = None  # per layer (H, n): the row of the query token
    pattern_keys: list[Tensor | None] | None = None  # per layer (H, n): summed over the queries

    def padded(self, n: int) -> _Target:
        """The same target over ``n`` tokens: zeros for the tokens after its own sequence."""

        def pad(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, (0, n - x.shape[-1]))

        def pads(xs: list[Tensor | None] | None) -> list[Tensor | None] | None:
            return None if xs is None else [None if x is None else pad(x) for x in xs]

        return replace(
            self,
            input=pad(self.input),
            layers=None if self.layers is None else pad(self.layers),
            pattern_query=pads(self.pattern_query),
            pattern_keys=pads(self.pattern_keys),
        )


@dataclass
class _View:
    name: str
    ids: list[int]
    texts: list[str]
    targets: list[_Target]


def _from_explanation(exp: Explanation, row: int) -> tuple[list[int], list[str], _Target]:
    """Token ids, display strings and the target of one row (padding dropped)."""
    if exp.modality != "tokens" or exp.token_ids is None:
        raise InputError(f"the explorer shows token relevance; this explanation has {exp.modality}")
    r = row_indices(exp, row)[0]
    texts, rel = row_items(exp, r)
    seq = exp.token_ids.shape[-1]
    mask = (
        exp.attention_mask[r].bool() if exp.attention_mask is not None else torch.ones(seq, dtype=torch.bool)
    )
    keep = mask.nonzero().flatten()
    target = exp.targets[r]
    place = target.position
    query = keep.tolist().index(place) if place is not None and bool(mask[place]) else None
    c = exp.captures
    out = _Target(target.describe(), float(exp.target_logit[r]), None, query, rel)
    if "layers" in c:
        out.layers = c["layers"][r][:, keep].float()
    if "heads" in c:
        out.heads = c["heads"][r].float()
        patterns = c.get("head_patterns", {})
        per_layer = [patterns[i][r].float() if i in patterns else None for i in range(out.heads.shape[0])]
        out.pattern_keys = [None if p is None else p[:, keep][:, :, keep].sum(1) for p in per_layer]
        out.pattern_query = [None if p is None or query is None else p[:, place, keep] for p in per_layer]
    return exp.token_ids[r][keep].tolist(), texts, out


def _from_generation(name: str, gen: GenerationExplanation) -> _View:
    n_p = gen.prompt_length
    ids = gen.token_ids.tolist()
    matrix = gen.matrix.detach().float().cpu()
    targets = [
        _Target(
            Target("token", (ids[i],), gen.tokens[i], i - 1).describe(),
            float(gen.target_logit[i - n_p]),
            i,
            i - 1,
            matrix[i - n_p],
        )
        for i in range(n_p, len(ids))
    ]
    return _View(name, ids, [display_token(t) for t in gen.tokens], targets)


def _from_steps(name: str, steps: Sequence[Explanation]) -> _View:
    """A generation given as one explanation per generated token: step ``t`` explains ``ids[:n_p + t]``
    with target ``ids[n_p + t]``."""
    if not steps or not all(isinstance(s, Explanation) for s in steps):
        raise InputError(f"view {name!r}: a list must hold Explanations, one per generated token")
    ids: list[int] = []
    texts: list[str] = []
    targets: list[_Target] = []
    for t, step in enumerate(steps):
        step_ids, step_texts, target = _from_explanation(step, 0)
        spec = step.targets[0]
        if t and step_ids != ids or len(spec.ids) != 1 or target.query != len(step_ids) - 1:
            raise InputError(
                f"view {name!r}: step {t} does not continue step {t - 1}; give one explanation per "
                "generated token: explain(model, ids[:n_prompt + t], target=int(ids[n_prompt + t]))"
            )
        target.slot = len(step_ids)
        ids, texts = step_ids + [spec.ids[0]], step_texts + [display_token(spec.label)]
        targets.append(target)
    return _View(name, ids, texts, [t.padded(len(ids)) for t in targets])


def _view(name: str, result: Any, row: int) -> _View:
    if isinstance(result, GenerationExplanation):
        return _from_generation(name, result)
    if isinstance(result, Explanation):
        ids, texts, target = _from_explanation(result, row)
        return _View(name, ids, texts, [target])
    if isinstance(result, Sequence) and not isinstance(result, str):
        return _from_steps(name, result)
    raise InputError(
        f"view {name!r} is a {type(result).__name__}; expected an Explanation, a GenerationExplanation "
        "or a list of Explanations (one per generated token)"
    )


def _named(views: Result | Mapping[str, Result]) -> dict[str, Result]:
    """A dict of view name -> result; a single result is named by its preset."""
    if isinstance(views, Mapping):
        named = {str(name): result for name, result in views.items()}
    else:
        first = views[0] if isinstance(views, Sequence) and not isinstance(views, str) and views else views
        named = {str(getattr(first, "rules", "view")): views}
    if not named:
        raise InputError("no views to explore: pass a result or a dict of preset name -> result")
    return named


def _views(views: Mapping[str, Result], row: int) -> list[_View]:
    out = [_view(name, result, row) for name, result in views.items()]
    for v in out[1:]:
        if v.ids != out[0].ids or [(t.slot, t.query) for t in v.targets] != [
            (t.slot, t.query) for t in out[0].targets
        ]:
            raise InputError(
                f"views {out[0].name!r} and {v.name!r} explain different tokens or targets; the views "
                "of one explorer must explain the same text, e.g. explore(model, text, presets=(...))"
            )
    shapes = {tuple(t.heads.shape) for v in out for t in v.targets if t.heads is not None}
    layers = {t.layers.shape[0] for v in out for t in v.targets if t.layers is not None}
    if len(shapes) > 1 or len(layers) > 1 or shapes and layers and layers != {next(iter(shapes))[0] + 1}:
        raise InputError(
            "the views' captures have different numbers of layers or heads: one model per explorer"
        )
    return out


# ------------------------------------------------------------------------------------- payload
def _row(values: Tensor, normalize: str) -> dict[str, Any]:
    """A heatmap row for the page: raw values (6 significant digits) and the colour limit."""
    values = torch.nan_to_num(values.detach().float().cpu())
    limit = colors.color_limit(values, normalize)
    lo, _, hi = legend_labels(limit)
    return {"v": [float(f"{v:.6g}") for v in values.flatten().tolist()], "lim": limit, "lo": lo, "hi": hi}


def _rows(per_layer: list[Tensor | None] | None, normalize: str) -> list[Any] | None:
    if per_layer is None:
        return None
    return [None if p is None else [_row(h, normalize) for h in p] for p in per_layer]


def _count(views: list[_View]) -> int:
    total = 0
    for t in (t for v in views for t in v.targets):
        tensors = [t.input, t.layers, t.heads, *(t.pattern_query or []), *(t.pattern_keys or [])]
        total += sum(x.numel() for x in tensors if x is not None)
    return total


def _payload(views: list[_View], normalize: str) -> dict[str, Any]:
    n_values = _count(views)
    if n_values > MAX_VALUES:
        raise InputError(
            f"the explorer would embed {n_values:,} values (at most {MAX_VALUES:,}): use fewer presets or "
            "generated tokens, a shorter text, or capture=('layers',) without the heads"
        )
    _normalize(torch.zeros(1), normalize)  # an unknown normalisation fails here
    bg, fg = colors.palette()
    heads = next((t.heads for v in views for t in v.targets if t.heads is not None), None)
    layers = next((t.layers for v in views for t in v.targets if t.layers is not None), None)
    n_layers = heads.shape[0] if heads is not None else layers.shape[0] - 1 if layers is not None else 0
    names = ["embeddings (input of layer 0)"] + [f"output of layer {i}" for i in range(n_layers)]
    return {
        "half": (len(bg) - 1) // 2,
        "bg": bg,
        "fg": fg,
        "nLayers": n_layers,
        "nHeads": heads.shape[1] if heads is not None else 0,
        "layerNames": ["residual stream: " + s for s in names] if layers is not None else [],
        "views": [
            {
                "name": v.name,
                "targets": [
                    {
                        "desc": t.desc,
                        "logit": f"{t.logit:.4g}",
                        "input": _row(t.input, normalize),
                        "layers": None if t.layers is None else [_row(x, normalize) for x in t.layers],
                        "heads": None if t.heads is None else _row(t.heads, normalize),
                        "patq": _rows(t.pattern_query, normalize),
                        "patk": _rows(t.pattern_keys, normalize),
                    }
                    for t in v.targets
                ],
            }
            for v in views
        ],
    }


# ---------------------------------------------------------------------------------------- HTML
_EXTRA_CSS = """<style>
.lxt-btn{font:inherit;font-size:12px;padding:1px 8px;margin:0 4px 4px 0;border:1px solid #d0d7de;
 border-radius:4px;background:#f6f8fa;color:#1f2328;cursor:pointer}
.lxt-btn.lxt-on{background:#1f2328;color:#fff;border-color:#1f2328}
.lxt-chip{cursor:pointer;border:1px dashed #8c959f;border-radius:3px;padding:0 4px;margin-left:6px}
.lxt-controls{font-size:12px;color:#57606a;margin:6px 0;display:flex;align-items:center;gap:8px;flex-wrap:wrap}
.lxt-heads{font-size:12px;color:#57606a;margin:6px 0}
.lxt-grid{display:grid;gap:1px;margin:4px 0;font-size:10px;color:#57606a;align-items:center}
.lxt-cell{width:14px;height:14px;padding:0;border:1px solid #eaeef2;border-radius:2px;cursor:pointer}
</style>"""

_SCRIPT = """(function(){
var root=document.getElementById(%s);if(!root)return;
var d=JSON.parse(root.querySelector('script.lxt-data').textContent);
function q(c){return root.querySelector(c);}function qa(c){return root.querySelectorAll(c);}
var toks=qa('.lxt-tok'),slots=qa('[data-target]'),cells=qa('.lxt-cell'),vbtn=qa('.lxt-view'),
 qbtn=qa('.lxt-q'),slider=q('.lxt-layer'),lpanel=q('.lxt-layers'),hpanel=q('.lxt-heads');
var s={v:0,t:0,mode:'input',layer:d.nLayers,l:0,h:0,q:'q'};
function fmt(x){return (x>0?'+':'')+Number(x.toPrecision(6));}
function paint(el,x,lim){var n=lim>0?Math.max(-1,Math.min(1,x/lim)):0,k=Math.round((n+1)*d.half);
 el.style.background=d.bg[k];el.style.color=d.fg[k];}
function pick(c){
 if(s.mode==='layer'&&c.layers)return [c.layers[s.layer],d.layerNames[s.layer]];
 if(s.mode==='head'&&c.heads){
  var p=(s.q==='q'?c.patq:c.patk),name='head '+s.h+' of layer '+s.l+
   (s.q==='q'?', query at the target position':', summed over all queries');
  return p&&p[s.l]?[p[s.l][s.h],name]:[null,name+': no pattern recorded'];}
 return [c.input,'input relevance'];}
function render(){
 var c=d.views[s.v].targets[s.t],r=pick(c),row=r[0],i;
 for(i=0;i<toks.length;i++){var x=row?row.v[i]:0;paint(toks[i],x,row?row.lim:0);toks[i].title='relevance '+fmt(x);}
 for(i=0;i<slots.length;i++)slots[i].classList.toggle('lxt-sel',+slots[i].getAttribute('data-target')===s.t);
 for(i=0;i<vbtn.length;i++)vbtn[i].classList.toggle('lxt-on',i===s.v);
 for(i=0;i<qbtn.length;i++)qbtn[i].classList.toggle('lxt-on',qbtn[i].getAttribute('data-q')===s.q);
 q('.lxt-preset').textContent=d.views[s.v].name;q('.lxt-desc').textContent=c.desc;
 q('.lxt-logit').textContent=c.logit;q('.lxt-what').textContent=r[1];
 q('.lxt-lo').textContent=row?row.lo:'-';q('.lxt-hi').textContent=row?row.hi:'+';
 if(lpanel){lpanel.style.display=c.layers?'':'none';slider.value=s.layer;}
 if(hpanel){hpanel.style.display=c.heads?'':'none';if(c.heads){
  q('.lxt-grid-lo').textContent=c.heads.lo;q('.lxt-grid-hi').textContent=c.heads.hi;
  for(i=0;i<cells.length;i++){paint(cells[i],c.heads.v[i],c.heads.lim);
   cells[i].title='layer '+Math.floor(i/d.nHeads)+' head '+(i%%d.nHeads)+': relevance '+fmt(c.heads.v[i]);
   cells[i].classList.toggle('lxt-sel',s.mode==='head'&&i===s.l*d.nHeads+s.h);}}}
}
function on(el,ev,f){el.addEventListener(ev,function(){f(el);render();});}
for(var i=0;i<slots.length;i++)on(slots[i],'click',function(el){s.t=+el.getAttribute('data-target');});
for(i=0;i<vbtn.length;i++)on(vbtn[i],'click',function(el){s.v=+el.getAttribute('data-view');});
for(i=0;i<cells.length;i++)on(cells[i],'click',function(el){
 s.mode='head';s.l=+el.getAttribute('data-layer');s.h=+el.getAttribute('data-head');});
for(i=0;i<qbtn.length;i++)on(qbtn[i],'click',function(el){s.q=el.getAttribute('data-q');s.mode='head';});
if(slider)on(slider,'input',function(el){s.mode='layer';s.layer=+el.value;});
on(q('.lxt-input'),'click',function(){s.mode='input';});
render();
})();"""


def _controls(data: dict[str, Any], first: dict[str, Any]) -> str:
    n_layers, n_heads = data["nLayers"], data["nHeads"]
    parts = [
        '<div class="lxt-controls"><button type="button" class="lxt-btn lxt-input">input relevance</button>'
    ]
    if data["layerNames"]:
        hidden = "" if first["layers"] else ' style="display:none"'
        parts.append(
            f'<span class="lxt-layers"{hidden}>layer <input type="range" class="lxt-layer" min="0" '
            f'max="{n_layers}" step="1" value="{n_layers}" aria-label="layer"> (0 = embeddings, '
            f"{n_layers} = output of the last layer)</span>"
        )
    parts.append("</div>")
    if n_heads:
        heads = first["heads"]
        cells = [f'<div style="grid-column:2/span {n_heads}">heads 0..{n_heads - 1}</div>']
        for layer in range(n_layers):
            cells.append(f"<div>L{layer}</div>")
            for h in range(n_heads):
                style = ""
                if heads:
                    norm = heads["v"][layer * n_heads + h] / heads["lim"] if heads["lim"] > 0 else 0.0
                    style = f' style="background:{colors.hex_color(norm)}"'
                cells.append(
                    f'<button type="button" class="lxt-cell" data-layer="{layer}" data-head="{h}"{style}></button>'
                )
        lo, hi = (escape(heads["lo"]), escape(heads["hi"])) if heads else ("", "")
        hidden = "" if heads else ' style="display:none"'
        parts.append(
            f'<div class="lxt-heads"{hidden}><div>relevance through each head (colour scale '
            f'<span class="lxt-grid-lo">{lo}</span> to <span class="lxt-grid-hi">{hi}</span>); click a head '
            "for its relevance-weighted pattern over the key tokens</div>"
            f'<div class="lxt-grid" style="grid-template-columns:28px repeat({n_heads},16px)">{"".join(cells)}'
            '</div><div>query: <button type="button" class="lxt-btn lxt-q lxt-on" data-q="q">target '
            'position</button><button type="button" class="lxt-btn lxt-q" data-q="k">all (sum)</button></div></div>'
        )
    return "".join(parts)


def _render(views: list[_View], data: dict[str, Any], normalize: str) -> str:
    uid = f"lxt-explorer-{uuid.uuid4().hex[:12]}"
    first = data["views"][0]["targets"][0]
    target0 = views[0].targets[0]
    rel = target0.input.float()
    norm = _normalize(rel, normalize)
    slots = {t.slot: i for i, t in enumerate(views[0].targets) if t.slot is not None}
    spans = []
    for i, text in enumerate(views[0].texts):
        span = token_span(
            text, float(rel[i]), float(norm[i]), "lxt-tok" + (" lxt-gen-tok" if i in slots else "")
        )
        if i in slots:
            span = span.replace("<span ", f'<span data-target="{slots[i]}" ', 1)
        spans.append(span)
    if target0.slot is None:  # one explained target, not part of the text
        label = escape(display_token(target0.desc))
        spans.append(
            f'<span class="lxt-chip lxt-sel" data-target="0" title="the explained target">&rarr; {label}</span>'
        )
    buttons = "".join(
        f'<button type="button" class="lxt-btn lxt-view{" lxt-on" if i == 0 else ""}" data-view="{i}">'
        f"{escape(v.name)}</button>"
        for i, v in enumerate(views)
    )
    hint = " &middot; click a generated (underlined) token" if slots else ""
    head = (f'<div class="lxt-head">{buttons}</div>' if len(views) > 1 else "") + (
        f'<div class="lxt-head lxt-status">preset <b class="lxt-preset">{escape(views[0].name)}</b> &middot; '
        f'explaining <b class="lxt-desc">{escape(first["desc"])}</b> &middot; logit <b class="lxt-logit">'
        f'{escape(first["logit"])}</b> &middot; showing <b class="lxt-what">input relevance</b>{hint}</div>'
    )
    return (
        f'<div class="lxt lxt-explorer" id="{uid}">{CSS}{_EXTRA_CSS}{head}'
        f'<div class="lxt-tokens" dir="auto">{"".join(spans)}</div>'
        f"{legend_html(first['input']['lim'], ids=True)}{_controls(data, first)}"
        f'<script type="application/json" class="lxt-data">{safe_json(data)}</script>'
        f"<script>{_SCRIPT % json.dumps(uid)}</script></div>"
    )


def explorer_html(views: Result | Mapping[str, Result], *, normalize: str = "max", row: int = 0) -> str:
    """An interactive, self-contained HTML view of one text under one or several presets.

    Click a target (a generated token, or the explained target shown after the text) to colour the
    tokens by its relevance; the preset buttons switch views; the layer slider shows the relevance
    of every token in the residual stream after each layer (``captures["layers"]``); the grid of
    layer x head cells (``captures["heads"]``) opens a head's relevance-weighted pattern over the key
    tokens (``captures["head_patterns"]``), for the query at the target position or summed over
    all queries.

    Parameters
    ----------
    views:
        A result, or a dict of view name (e.g. preset) -> result, all over the same tokens. A result
        is an :class:`~lxt_plus.results.result.Explanation` (its captures are shown when present), a
        :class:`~lxt_plus.results.result.GenerationExplanation` (input relevance of every generated token),
        or a list of explanations, one per generated token, where item ``t`` explains
        ``ids[:n_prompt + t]`` with ``target=ids[n_prompt + t]`` (with ``capture=``: layers and heads
        for every generated token; :func:`explore` makes these).
    normalize:
        ``"max"``, ``"sum"`` or ``"none"`` (see :func:`lxt_plus.results.words.normalize`), applied to each
        heatmap (a target's input relevance, one layer, one head's pattern, the head grid).
    row:
        Row of a batch explanation to show.

    Returns
    -------
    str
        An HTML fragment with inline CSS and script and a unique element id (several can share a
        notebook); token text is escaped and the embedded JSON cannot end its ``<script>`` element.

    Raises
    ------
    InputError
        For views over different tokens, non-token explanations, or more than :data:`MAX_VALUES`
        embedded numbers.
    """
    parsed = _views(_named(views), row)
    return _render(parsed, _payload(parsed, normalize), normalize)


# ------------------------------------------------------------------------------------ Explorer
class Explorer:
    """The explorer of :func:`explore`: shows itself in notebooks, renders to HTML, saves a page.

    Parameters
    ----------
    views:
        A result or a dict of view name -> result, as for :func:`explorer_html`.
    normalize:
        ``"max"``, ``"sum"`` or ``"none"``.

    Attributes
    ----------
    views:
        View (preset) name -> the result shown.
    normalize:
        The normalisation of every heatmap.
    """

    def __init__(self, views: Result | Mapping[str, Result], normalize: str = "max") -> None:
        self.views = _named(views)
        self.normalize = normalize
        self._parsed = _views(self.views, 0)
        self._data = _payload(self._parsed, normalize)

    def to_html(self) -> str:
        """The explorer as an HTML fragment (a fresh element id on every call)."""
        return _render(self._parsed, self._data, self.normalize)

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a standalone ``.html`` page (no external resources)."""
        if Path(path).suffix.lower() not in (".html", ".htm"):
            raise InputError(f"an explorer is saved as .html, got {str(path)!r}")
        from lxt_plus.render import html_page

        Path(path).write_text(html_page(self.to_html(), "lxt_plus explorer"), encoding="utf-8")

    def __repr__(self) -> str:
        v = self._parsed[0]
        return (
            f"Explorer(presets={[p.name for p in self._parsed]}, tokens={len(v.ids)}, "
            f"targets={len(v.targets)}, layers={self._data['nLayers']}, heads={self._data['nHeads']})"
        )
