"""explore(): explain one text under several presets, token by token, and open it in the explorer.

The page itself (:class:`~lxt_plus.render.explorer.Explorer`) is built in
:mod:`lxt_plus.render.explorer` from explanations; this module computes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lxt_plus.api.capture import PATTERN_MAX_SEQ, find_blocks
from lxt_plus.api.explain import explain, model_kind
from lxt_plus.api.generation import as_ids, eos_ids, explain_generation, generate_greedy
from lxt_plus.engine.plan import get_preset
from lxt_plus.errors import InputError, UnsupportedModelError
from lxt_plus.render import explorer
from lxt_plus.render.explorer import CAPTURES, MAX_NEW_TOKENS, Explorer, Result

__all__ = ["explore"]


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InputError(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def explore(
    model: nn.Module,
    text: str | Tensor | Sequence[int],
    tokenizer: Any = None,
    *,
    presets: str | Sequence[Any] = ("attnlrp",),
    max_new_tokens: int = 0,
    capture: str | Sequence[str] | None = CAPTURES,
    target: Any = None,
    chat: bool = False,
    normalize: str = "max",
    progress: bool = False,
) -> Explorer:
    """Explain one text under several presets and return an interactive :class:`Explorer`.

    Parameters
    ----------
    model:
        A HF causal LM (or, without generation, a sequence classifier).
    text:
        The text (with ``tokenizer``) or its token ids ``(seq,)``.
    tokenizer:
        The model's tokenizer.
    presets:
        Preset names (or :class:`~lxt_plus.engine.plan.Preset`), one view each, e.g.
        ``("attnlrp", "cp-lrp", "gradient")``.
    max_new_tokens:
        0 explains the prediction at the end of the text (or ``target``); ``N`` generates up to N
        tokens greedily and explains each of them (at most :data:`~lxt_plus.render.explorer.MAX_NEW_TOKENS`).
    capture:
        Any of ``"layers"`` and ``"heads"`` (the layer slider and the head grid), or ``None``. With
        generated tokens each token is explained on its own (one :func:`~lxt_plus.explain` per
        token and preset) to capture them; without, one
        :func:`~lxt_plus.explain_generation` per preset explains all.
    target:
        With ``max_new_tokens=0``: the token (id or string) or class to explain instead of the
        prediction.
    chat:
        Wrap the text in the tokenizer's chat template.
    normalize:
        Normalisation of every heatmap, see :func:`~lxt_plus.render.explorer.explorer_html`.
    progress:
        Show a tqdm bar over the explain calls.

    Returns
    -------
    Explorer
        Shows itself in Jupyter and VS Code; ``to_html()`` and ``save(path)`` give the HTML.

    Raises
    ------
    InputError
        For unknown captures, too many new tokens, a target together with generation, or a page
        that would embed more than :data:`~lxt_plus.render.explorer.MAX_VALUES` numbers (for a generation: estimated before
        generating).
    UnsupportedModelError
        For ``max_new_tokens`` with a model that is not a causal LM.

    Examples
    --------
    >>> ex = lxt_plus.explore(model, "The capital of France is", tok,  # doctest: +SKIP
    ...                       presets=("attnlrp", "cp-lrp"), max_new_tokens=5)
    >>> ex.save("explorer.html")  # doctest: +SKIP
    """
    items = (presets,) if isinstance(presets, str) else tuple(presets)
    chosen = [get_preset(p) for p in items]
    names = [p.name for p in chosen]
    if not chosen or len(set(names)) != len(names):
        raise InputError(f"presets must name at least one preset, each once; got {names}")
    captures = () if capture is None else (capture,) if isinstance(capture, str) else tuple(capture)
    if any(c not in CAPTURES for c in captures):
        raise InputError(f"the explorer shows the captures {', '.join(CAPTURES)}; got {captures}")
    n_new = _check_int(max_new_tokens, "max_new_tokens", 0, MAX_NEW_TOKENS)
    if not isinstance(text, str):  # token ids; a batch or a list of texts is refused here
        if isinstance(text, (list, tuple)) and any(isinstance(t, str) for t in text):
            raise InputError("explore takes one text (or its token ids); explore several texts one by one")
        text = as_ids(text, tokenizer, "text")
    views: dict[str, Result] = {}
    if not n_new:
        for p in tqdm(chosen, desc="explaining", disable=not progress, leave=False):
            views[p.name] = explain(
                model, text, target, tokenizer=tokenizer, rules=p, capture=captures or None, chat=chat
            )
        return Explorer(views, normalize)
    if target is not None:
        raise InputError("with max_new_tokens the generated tokens are the targets; drop target=")
    if model_kind(model) != "causal-lm":
        raise UnsupportedModelError(
            f"max_new_tokens needs a causal LM, got {type(model).__name__}; use max_new_tokens=0"
        )
    prompt = as_ids(text, tokenizer, "prompt", chat, model)
    _check_budget(model, prompt.numel() + n_new, n_new * len(chosen), captures)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    generated = generate_greedy(model, prompt, n_new, eos_ids(model, tokenizer), pad)
    if generated.numel() == 0:
        raise InputError("no token was generated: there is nothing to explain")
    if not captures:
        for p in chosen:
            views[p.name] = explain_generation(model, tokenizer, prompt, continuation=generated, rules=p)
        return Explorer(views, normalize)
    ids, n_p = torch.cat([prompt, generated]), prompt.numel()
    with tqdm(
        total=len(chosen) * len(generated), desc="explaining", disable=not progress, leave=False
    ) as bar:
        for p in chosen:
            steps = []
            for t in range(len(generated)):
                steps.append(
                    explain(
                        model,
                        ids[: n_p + t],
                        int(ids[n_p + t]),
                        tokenizer=tokenizer,
                        rules=p,
                        capture=captures,
                    )
                )
                bar.update()
            views[p.name] = steps
    return Explorer(views, normalize)


def _check_budget(model: nn.Module, n_tokens: int, n_targets: int, captures: Sequence[str]) -> None:
    """Refuse, before explaining, a page that would embed more than :data:`~lxt_plus.render.explorer.MAX_VALUES` numbers."""
    n_layers = n_heads = 0
    if captures:
        parts = find_blocks(model)[1]
        n_layers, n_heads = len(parts), max(p.n_heads for p in parts)
    per_target = n_tokens
    if "layers" in captures:
        per_target += (n_layers + 1) * n_tokens
    if "heads" in captures:
        per_target += n_layers * n_heads * (1 + (2 * n_tokens if n_tokens <= PATTERN_MAX_SEQ else 0))
    if per_target * n_targets > explorer.MAX_VALUES:
        raise InputError(
            f"the explorer would embed about {per_target * n_targets:,} values (at most {explorer.MAX_VALUES:,}): "
            "use fewer presets or max_new_tokens, a shorter text, or capture=('layers',) without the heads"
        )
