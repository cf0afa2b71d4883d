"""``explain_generation``: every generated token explained from one shared forward pass.

The whole sequence (prompt and generated tokens, without the last one) runs through the patched
model once, keeping the logits only at the positions that predicted a generated token. The
generated tokens' logits are then differentiated with ``torch.autograd.grad(..., retain_graph=True)``
with respect to the same token-embedding leaf, several targets per batched backward pass, so the
forward graph is built once for all targets. Row ``t`` equals
``explain(model, ids[:prompt_length + t], target=ids[prompt_length + t])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lxt_plus.api.explain import (
    as_images,
    check_ids,
    explaining,
    image_grid,
    image_input_errors,
    image_owners,
    is_seq2seq,
    leaf_at_embeddings,
    model_kind,
    pixel_grid,
    position_tables,
    prepare_text,
    with_pixel_leaf,
)
from lxt_plus.engine.detect import accepts, decoder_start, input_device, patch_size, require_module
from lxt_plus.engine.functional import acc
from lxt_plus.engine.offload import offloaded_saves
from lxt_plus.engine.patching import check_images
from lxt_plus.engine.plan import Preset, get_preset
from lxt_plus.engine.positional import positional_leaves
from lxt_plus.errors import (
    InputError,
    NumericalError,
    UnsupportedModelError,
)
from lxt_plus.results.result import GenerationExplanation

__all__ = ["explain_generation"]

_MAX_CHUNK = 32  # targets per batched backward pass
_CHUNK_BUDGET = 8192  # targets x tokens per batched backward pass (bounds the memory of the batched grads)


def as_ids(
    value: str | Tensor | Sequence[int],
    tokenizer: Any,
    what: str,
    chat: bool = False,
    model: nn.Module | None = None,
) -> Tensor:
    """1-D token ids from text (tokenised), a tensor ``(seq,)``/``(1, seq)`` or a list of ints."""
    if isinstance(value, str):
        if tokenizer is None:
            raise InputError(f"a text {what} needs a tokenizer; or pass token ids")
        if what == "prompt":
            return prepare_text(tokenizer, [value], model, chat=chat)[0][0]
        if not value:
            raise InputError(f"the {what} is empty: there is nothing to explain")
        return torch.tensor(tokenizer.encode(value, add_special_tokens=False), dtype=torch.long)
    ids = value if isinstance(value, Tensor) else torch.tensor(list(value), dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.is_floating_point():
        raise InputError(
            f"the {what} must be text or integer ids of shape (seq,), got {ids.dtype} {tuple(ids.shape)}"
        )
    return ids.long().cpu()


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def generate_greedy(
    model: nn.Module,
    prompt: Tensor,
    max_new_tokens: int,
    eos: set[int],
    pad: int | None,
    image_inputs: dict[str, Any] | None = None,
) -> Tensor:
    """Greedy continuation ids ``(n_generated,)``, up to and including the first end-of-sequence token."""
    device = input_device(model)
    ids = prompt[None].to(device)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    if is_seq2seq(model):
        kwargs["decoder_start_token_id"] = decoder_start(model)
    for name, value in (image_inputs or {}).items():
        kwargs[name] = value.to(device) if isinstance(value, Tensor) else value
    if eos:
        kwargs["eos_token_id"] = sorted(eos)
    if pad is not None:
        kwargs["pad_token_id"] = pad
    elif eos:
        kwargs["pad_token_id"] = min(eos)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)  # type: ignore[operator]
    # an encoder-decoder returns the decoder's ids, starting with its start token
    first = 1 if is_seq2seq(model) else prompt.shape[0]
    return _cut_at_eos(out[0, first:].cpu(), eos)


def _cut_at_eos(ids: Tensor, eos: set[int]) -> Tensor:
    for i, tok in enumerate(ids.tolist()):
        if tok in eos:
            return ids[: i + 1]
    return ids


def explain_generation(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Tensor | Sequence[int] | dict[str, Any],
    max_new_tokens: int = 32,
    *,
    continuation: str | Tensor | Sequence[int] | None = None,
    rules: str | Preset | dict[str, Any] = "attnlrp",
    chat: bool = False,
    progress: bool = False,
    images: dict[str, Any] | None = None,
) -> GenerationExplanation:
    """Explain each generated token by the prompt and the tokens generated before it.

    Parameters
    ----------
    model:
        A HF causal LM, or an encoder-decoder (T5, BART, ...): then ``prompt`` is the source, the
        "prompt" part of the result is the source and the decoder's start token, and row ``t``
        equals ``explain(model, source, decoder_input_ids=[start, *generated[:t]])`` (its
        ``relevance`` then its ``decoder_relevance``).
    tokenizer:
        Its tokenizer (needed for text and for the token strings of the result; may be ``None``
        when ``prompt`` and ``continuation`` are ids).
    prompt:
        Text, token ids ``(seq,)``, or a vision-language processor's output (ids and images).
    max_new_tokens:
        How many tokens to generate greedily (``model.generate(do_sample=False)``); generation
        stops after an end-of-sequence token, which is explained too. Ignored with ``continuation``.
    continuation:
        Explain this continuation (text or ids) instead of generating one.
    rules:
        Preset name, YAML path or :class:`~lxt_plus.engine.plan.Preset`.
    chat:
        Wrap the prompt in the tokenizer's chat template (user turn + generation prompt).
    progress:
        Show a tqdm bar over the generated tokens on stderr.
    images:
        Vision-language models: the processor's image inputs (``pixel_values`` and whatever else
        it returns beside the ids, such as ``image_sizes``); ``prompt`` then holds the image
        placeholder tokens. A processor's whole output may also be passed as ``prompt``. The
        result's ``image_matrix`` gives each generated token's pixel relevance.

    Returns
    -------
    GenerationExplanation
        ``matrix`` ``(n_generated, n_prompt + n_generated)``: row ``t`` is the relevance for the
        logit of generated token ``t`` at the position that predicted it; it is 0 at and after the
        token's own position.

    Notes
    -----
    Cost: one forward pass over ``n_prompt + n_generated - 1`` tokens (the vocabulary projection only
    at the ``n_generated`` predicting positions) and input-only backward passes through the shared
    graph, up to 32 targets per batched pass (Achtibat et al. 2024, AttnLRP, applied per target).
    """
    require_module(model, "explain_generation")
    if model_kind(model) != "causal-lm":
        raise UnsupportedModelError(
            f"explain_generation needs a causal LM, got {type(model).__name__}; explain a classifier with explain()"
        )
    if continuation is None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    preset = get_preset(rules)  # a bad preset fails before the generation
    if isinstance(prompt, dict) or (hasattr(prompt, "keys") and not isinstance(prompt, Tensor)):
        data = dict(prompt)  # a processor's output: ids and image inputs
        if "input_ids" not in data:
            raise InputError(f"a prompt mapping needs 'input_ids', got keys {sorted(data)}")
        prompt = cast(Tensor, data.pop("input_ids"))
        data.pop("attention_mask", None)
        images = {**data, **(images or {})}
    image_inputs = _image_inputs(model, images)
    prompt_ids = as_ids(prompt, tokenizer, "prompt", chat, model)
    if prompt_ids.numel() == 0:
        raise InputError("the prompt has no tokens: there is nothing to condition on")
    eos = eos_ids(model, tokenizer)
    if continuation is None:
        with image_input_errors(model, bool(image_inputs)):
            gen_ids = generate_greedy(
                model,
                prompt_ids,
                max_new_tokens,
                eos,
                getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
                image_inputs,
            )
    else:
        gen_ids = as_ids(continuation, tokenizer, "continuation")
    if gen_ids.numel() == 0:
        raise InputError("no token was generated (or the continuation is empty): there is nothing to explain")
    if is_seq2seq(model):  # the "prompt" is the source and the decoder's start token
        start = decoder_start(model)
        check_ids(model, prompt_ids, what="the source")
        check_ids(model, gen_ids, what="the continuation")
        ids = torch.cat([prompt_ids, torch.tensor([start]), gen_ids])
        n_p = prompt_ids.numel() + 1
        if image_inputs:
            raise UnsupportedModelError(
                "explain_generation with images needs a decoder-only vision-language model"
            )
        matrix, logits = _attribute_seq2seq(model, ids, prompt_ids.numel(), preset, progress)
        image_matrix = None
    else:
        ids = torch.cat([prompt_ids, gen_ids])
        check_ids(model, ids, length=ids.numel() - 1, what="the prompt and continuation")
        n_p = prompt_ids.numel()
        with image_input_errors(model, bool(image_inputs)):
            matrix, logits, image_matrix = _attribute(model, ids, n_p, preset, progress, image_inputs)
    tokens = (
        tokenizer.batch_decode([[i] for i in ids.tolist()])
        if tokenizer is not None
        else [str(i) for i in ids.tolist()]
    )
    pixels = image_inputs.get("pixel_values")
    return GenerationExplanation(
        tokens=tokens,
        token_ids=ids,
        prompt_length=n_p,
        matrix=matrix,
        target_logit=logits,
        rules=preset.name,
        image_matrix=image_matrix,
        pixels=None
        if pixels is None or image_matrix is None
        else as_images(model, pixels.detach(), image_grid(image_inputs), copies="mean").cpu(),
        patch_size=patch_size(model) if image_matrix is not None else None,
    )


def _image_inputs(model: nn.Module, images: dict[str, Any] | None) -> dict[str, Any]:
    """The image inputs of a vision-language prompt (one row), checked: ``pixel_values`` laid out as images."""
    if not images:
        return {}
    pixels = images.get("pixel_values")
    if not isinstance(pixels, Tensor):
        raise InputError("images= needs 'pixel_values', a floating-point tensor (the processor's output)")
    image_owners(model, pixels, rows=1, grid=image_grid(images))
    return {k: v for k, v in images.items() if v is not None}


def _along_tokens(inputs: dict[str, Any], n_prompt: int, length: int) -> dict[str, Any]:
    """``inputs`` with the prompt's token types (Qwen2-VL's ``mm_token_type_ids``, ``(1, n_prompt)``)
    padded with 0, the type of a text token, to ``length`` tokens: the continuation is text."""
    out = dict(inputs)
    for name, value in inputs.items():
        if (
            name.endswith("token_type_ids")
            and isinstance(value, Tensor)
            and not value.is_floating_point()
            and value.dim() == 2
            and tuple(value.shape) == (1, n_prompt)
            and length > n_prompt
        ):
            out[name] = torch.nn.functional.pad(value, (0, length - n_prompt))
    return out


def _attribute(
    model: nn.Module, ids: Tensor, n_p: int, rules: Preset, progress: bool, image_inputs: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One patched forward over ``ids[:-1]``; relevance ``(n_generated, n)``, target logits
    ``(n_generated,)`` and, with images, their pixel relevance ``(n_generated, images, H, W)``."""
    n, n_g = ids.numel(), ids.numel() - n_p
    device = input_device(model)
    inp = ids[None, :-1].to(device)
    positions = torch.arange(n_p - 1, n - 1, device=device)  # position t predicts token t + 1
    extras, pixels = with_pixel_leaf(_along_tokens(image_inputs, n_p, n - 1), device)
    kwargs: dict[str, Any] = {"input_ids": inp, "attention_mask": torch.ones_like(inp), **extras}
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    kept = accepts(model, "logits_to_keep")
    if kept:
        kwargs["logits_to_keep"] = positions
    store: list[Tensor] = []
    extra: list[Tensor] = []
    with explaining(model, rules) as handle:
        if pixels is not None:  # a vision tower the patch-time probe could not reach: checked here
            check_images(handle, {**kwargs, "pixel_values": pixels.detach()})
        with (
            leaf_at_embeddings(model, store, extra, 1),
            offloaded_saves(model),
            positional_leaves() as rotary,
        ):
            out = model(**kwargs)
        if not store:
            raise UnsupportedModelError(f"{type(model).__name__} did not call its input embeddings")
        # PA-LRP: each position's relevance joins its token's, as explain's relevance does
        angles = [t for call in rotary for t in call] + position_tables(extra) if rules.positional else []
        leaf = store[0]
        logits = out.logits[0] if kept and out.logits.shape[1] == n_g else out.logits[0, positions]
        targets = ids[n_p:].to(device)
        picked = acc(logits[torch.arange(n_g, device=device), targets])
        if not torch.isfinite(picked).all():
            raise NumericalError(
                f"a target logit is not finite in dtype {logits.dtype}; use float32 or bfloat16"
            )
        grid = None if pixels is None else pixel_grid(pixels)
        matrix, image_matrix = _matrix(
            picked, (leaf,), n, progress, pixels, angles, lambda r: as_images(model, r, grid)
        )
    if not torch.isfinite(matrix).all():
        raise NumericalError(f"relevance has NaN/inf (model dtype {leaf.dtype}); use bfloat16 or float32")
    return matrix, picked.detach().cpu(), image_matrix


def _attribute_seq2seq(
    model: nn.Module, ids: Tensor, n_s: int, rules: Preset, progress: bool
) -> tuple[Tensor, Tensor]:
    """Encoder-decoder: one patched forward of the source and the decoder prefix (start token and
    generated tokens but the last); rows as :func:`_attribute`, columns source then decoder."""
    n = ids.numel()
    n_g = n - n_s - 1
    device = input_device(model)
    src = ids[None, :n_s].to(device)
    dec = ids[None, n_s:-1].to(device)
    kwargs: dict[str, Any] = {
        "input_ids": src,
        "attention_mask": torch.ones_like(src),
        "decoder_input_ids": dec,
    }
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    store: list[Tensor] = []
    extra: list[Tensor] = []
    with explaining(model, rules):
        with leaf_at_embeddings(model, store, extra, 1), offloaded_saves(model):
            out = model(**kwargs)
        if len(store) < 2:
            raise UnsupportedModelError(
                f"{type(model).__name__} did not call the encoder's and the decoder's input embeddings"
            )
        enc_leaf, dec_leaf = store[0], store[-1]
        targets = ids[n_s + 1 :].to(device)
        picked = acc(out.logits[0, torch.arange(n_g, device=device), targets])
        if not torch.isfinite(picked).all():
            raise NumericalError("a target logit is not finite; use float32 or bfloat16")
        # columns: the source, then the decoder prefix (start token first), read causally as well
        matrix, _ = _matrix(picked, (enc_leaf, dec_leaf), n, progress)
    if not torch.isfinite(matrix).all():
        raise NumericalError("relevance has NaN/inf; use bfloat16 or float32")
    return matrix, picked.detach().cpu()


def _matrix(
    picked: Tensor,
    leaves: tuple[Tensor, ...],
    n: int,
    progress: bool,
    pixels: Tensor | None = None,
    positions: Sequence[Tensor] = (),
    to_images: Callable[[Tensor], Tensor] = lambda r: r,
) -> tuple[Tensor, Tensor | None]:
    """The ``(n_generated, n)`` relevance matrix: row ``t`` is ``Σ_d x · ∂picked[t]/∂x`` over the
    leaves' columns side by side (``n - 1`` in all: every token but the last is read), zero at and
    after the column of generated token ``t`` itself (the last ``n_generated`` of the ``n`` tokens).
    With ``pixels`` (a vision-language prompt's images, a leaf too), also their relevance per row,
    ``(n_generated, images, H, W)``, from the same backward passes; ``to_images`` lays one
    target's pixel relevance out as images (:func:`~lxt_plus.api.explain.as_images`). ``positions`` (leaves laid
    out along the tokens: rotary angles, position tables) add each position's relevance to its
    token's column (PA-LRP's position-token pairs).
    Targets share batched backward passes of up to ``_MAX_CHUNK`` rows (see :func:`_grads`)."""
    from tqdm.auto import tqdm

    n_g = picked.numel()
    values = [acc(leaf.detach()[0]) for leaf in leaves]
    every = (*leaves, *(() if pixels is None else (pixels,)), *positions)
    rows: list[Tensor] = []
    image_rows: list[Tensor] = []
    chunk = max(1, min(_MAX_CHUNK, _CHUNK_BUDGET // n))
    with tqdm(total=n_g, desc="explaining generated tokens", disable=not progress, leave=False) as bar:
        for start in range(0, n_g, chunk):
            stop = min(n_g, start + chunk)
            grads = _grads(picked, every, start, stop, last=stop == n_g)
            token_grads = grads[: len(leaves)]
            row = torch.cat(
                [(v * acc(g[:, 0])).sum(-1) for v, g in zip(values, token_grads, strict=True)], -1
            )
            for p, g in zip(positions, grads[len(grads) - len(positions) :], strict=True):
                r = (acc(p.detach())[None] * acc(g)).sum(-1)
                r = r.reshape(r.shape[0], -1, r.shape[-1]).sum(1)
                if r.shape[-1] == row.shape[-1]:
                    row = row + r.to(row.dtype)
            rows.append(row.cpu())
            if pixels is not None:
                rel = acc(pixels.detach())[None] * acc(grads[len(leaves)])
                image_rows.append(torch.stack([to_images(r) for r in rel]).sum(2).cpu())
            bar.update(stop - start)
    full = torch.cat(rows)  # (n_g, n - 1)
    matrix = torch.zeros(n_g, n, dtype=full.dtype)
    causal = torch.arange(n - 1)[None] < torch.arange(n - n_g, n)[:, None]  # column < token position
    matrix[:, : n - 1] = torch.where(causal, full, torch.zeros(()))
    return matrix, torch.cat(image_rows) if image_rows else None


def _grads(
    picked: Tensor, leaves: tuple[Tensor, ...], start: int, stop: int, last: bool
) -> tuple[Tensor, ...]:
    """Gradients of ``picked[start:stop]`` w.r.t. each of ``leaves``, ``(stop - start, *leaf.shape)``.

    Several targets share one batched backward pass (``is_grads_batched``: the graph is walked
    once with a batch of upstream gradients); a model whose backward cannot be batched falls back
    to one pass per target. The graph is kept until the last target.
    """
    k = stop - start

    def dense(grads: Sequence[Tensor | None], batch: tuple[int, ...]) -> tuple[Tensor, ...]:
        # a leaf the target does not depend on (rotary angles under constant attention weights)
        return tuple(
            torch.zeros(*batch, *leaf.shape, dtype=leaf.dtype, device=leaf.device) if g is None else g
            for g, leaf in zip(grads, leaves, strict=True)
        )

    if k > 1:
        eye = torch.zeros(k, picked.numel(), dtype=picked.dtype, device=picked.device)
        eye[torch.arange(k), torch.arange(start, stop)] = 1
        try:
            return dense(
                torch.autograd.grad(
                    picked,
                    leaves,
                    grad_outputs=eye,
                    is_grads_batched=True,
                    retain_graph=True,
                    allow_unused=True,
                ),
                (k,),
            )
        except RuntimeError:  # an op without a batching rule: one pass per target below
            pass
    per = [
        dense(
            torch.autograd.grad(picked[t], leaves, retain_graph=not last or t < stop - 1, allow_unused=True),
            (),
        )
        for t in range(start, stop)
    ]
    return tuple(torch.stack([p[i] for p in per]) for i in range(len(leaves)))
