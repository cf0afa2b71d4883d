"""``explain_similarity``: why a caption matches an image, for image-text dual encoders (CLIP, SigLIP).

The score is ``s = τ · ⟨a / ‖a‖, b / ‖b‖⟩ (+ β)`` with ``a`` the image embedding, ``b`` the text
embedding, ``τ`` the learned logit scale and ``β`` SigLIP's logit bias. Its rule:

- the two norms are held constant, as the conservative norm rule holds a LayerNorm's scale
  (Ali et al. 2022), so each embedding enters linearly;
- the dot product is a sum of products ``a_d b_d`` of two input-dependent factors, which get the
  uniform rule (Achtibat et al. 2024, Prop. 3.3), as ``q·kᵀ`` does in AttnLRP: each product's
  contribution ``τ a_d b_d / (‖a‖ ‖b‖)`` goes half to the image side and half to the text side;
- ``β`` is a bias: it keeps its share (zeroed under ``conservative-check``).

So image relevance + text relevance + position relevance = ``s - β`` where the towers conserve,
and each tower passes its half on with the preset's rules. One forward pass of both towers and one
backward pass.

``pairs=True`` adds BiLRP (Eberle et al. 2020, "Building and interpreting deep similarity
models"): the score is a sum over embedding dimensions, ``s - β = τ Σ_d â_d b̂_d`` with
``â = a / ‖a‖``, so the relevance of the pair (image patch ``i``, caption token ``j``) is

    R_ij = τ Σ_d R_i(â_d) · R_j(b̂_d)

where ``R(â_d)`` explains the one output ``â_d`` with the preset's rules (the norm held constant).
Where the towers conserve, ``Σ_ij R_ij`` plus the terms that involve the position tables is
``s - β``, and summing over the tokens gives twice the first-order relevance of each patch (the
uniform rule gives each side half). It costs one batched backward pass per ``chunk`` embedding
dimensions and side, through the graph of the same forward pass.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from lxt_plus.api.explain import check_image, explaining, leaf_at_embeddings
from lxt_plus.engine.detect import input_device, patch_size, require_module
from lxt_plus.engine.functional import acc, uniform_matmul
from lxt_plus.engine.patching import dual_embeddings, is_dual_encoder
from lxt_plus.engine.plan import Preset
from lxt_plus.errors import InputError, UnsupportedModelError
from lxt_plus.results.images import ImageRelevance, pool_patches
from lxt_plus.results.similarity import SimilarityExplanation

__all__ = ["explain_similarity"]


def explain_similarity(
    model: nn.Module,
    inputs: Any,
    *,
    tokenizer: Any = None,
    rules: str | Preset | dict[str, Any] = "attnlrp",
    pairs: bool = False,
    chunk: int = 64,
) -> SimilarityExplanation:
    """Explain the similarity of one caption and one image.

    Parameters
    ----------
    model:
        A HF dual encoder with ``get_image_features`` and ``get_text_features`` (``CLIPModel``,
        ``SiglipModel``, ...).
    inputs:
        The processor's output for one caption and one image: ``input_ids`` ``(1, seq)`` (with
        ``attention_mask`` where the model takes one) and ``pixel_values`` ``(1, C, H, W)``.
    tokenizer:
        For the token strings (the processor's ``tokenizer``).
    rules:
        Preset for the towers; the comparison gets the rule in the module docstring.
    pairs:
        Also compute BiLRP's patch × token relevance (``SimilarityExplanation.pairs``; see the
        module docstring). Patches are the model's (pixels for a model without a patch size).
    chunk:
        Embedding dimensions per batched backward pass with ``pairs=True`` (memory: ``chunk``
        gradients of the image at a time).

    Returns
    -------
    SimilarityExplanation
    """
    require_module(model, "explain_similarity")
    if not is_dual_encoder(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not an image-text dual encoder (get_image_features and "
            "get_text_features); explain a classifier or a vision-language model with explain()"
        )
    data = dict(inputs) if hasattr(inputs, "keys") else None
    if data is None or "input_ids" not in data or "pixel_values" not in data:
        raise InputError("explain_similarity needs the processor's output: input_ids and pixel_values")
    ids, pixels = data["input_ids"], data["pixel_values"]
    if not isinstance(ids, Tensor) or not isinstance(pixels, Tensor):
        raise InputError("input_ids and pixel_values must be tensors (return_tensors='pt')")
    if "spatial_shapes" in data:
        raise UnsupportedModelError(
            f"{type(model).__name__}: explain_similarity does not read patch lists with spatial_shapes "
            "(SigLIP2's image inputs); explain its image classifier with explain(), which does"
        )
    ids = ids[None] if ids.dim() == 1 else ids
    pixels = pixels[None] if pixels.dim() == 3 else pixels
    if ids.shape[0] != 1 or pixels.shape[0] != 1:
        raise InputError(
            f"explain_similarity explains one caption and one image, got {ids.shape[0]} and {pixels.shape[0]}"
        )
    check_image(model, pixels)
    device = input_device(model)
    text_inputs = {
        k: v.to(device) for k, v in data.items() if k not in ("pixel_values",) and isinstance(v, Tensor)
    }
    hf = cast(Any, model)
    with explaining(model, rules) as handle:
        leaf = pixels.detach().to(device).requires_grad_(True)
        store: list[Tensor] = []
        extra: list[Tensor] = []
        with leaf_at_embeddings(model, store, extra, 1):
            image, text = dual_embeddings(model, pixel_values=leaf, **text_inputs)
        if not store:
            raise UnsupportedModelError(
                f"{type(model).__name__}'s text tower did not call its input embeddings"
            )
        a = acc(image) / acc(image).detach().norm(dim=-1, keepdim=True)
        b = acc(text) / acc(text).detach().norm(dim=-1, keepdim=True)
        score = uniform_matmul(a, b.T)[0, 0] * acc(hf.logit_scale).exp()
        bias = getattr(hf, "logit_bias", None)
        value = score + (acc(bias).reshape(()) if isinstance(bias, Tensor) else 0.0)
        grads = torch.autograd.grad(score, [leaf, store[0], *extra], allow_unused=True, retain_graph=pairs)
        preset = handle.preset.name
        second = None
        if pairs:
            if chunk < 1:
                raise InputError(f"chunk must be a positive number of embedding dimensions, got {chunk}")
            size = patch_size(model) or 1
            image_side = _per_dimension(
                a[0], leaf, extra, chunk, lambda r: pool_patches(r[:, 0].sum(1), size)
            )
            text_side = _per_dimension(b[0], store[0], extra, chunk, lambda r: r.sum(-1)[:, 0])
            second = _pairs(image_side, text_side, float(acc(hf.logit_scale).exp()), text_inputs)

    def relevance(x: Tensor, g: Tensor | None) -> Tensor:
        return (acc(x.detach()) * (acc(g) if g is not None else torch.zeros_like(acc(x)))).cpu()

    channels = relevance(leaf, grads[0])
    tokens_rel = relevance(store[0], grads[1]).sum(-1)[0]
    mask = text_inputs.get("attention_mask")
    if mask is not None:
        tokens_rel = tokens_rel * mask[0].cpu().to(tokens_rel.dtype)
    positions = sum(float(relevance(x, g).sum()) for x, g in zip(extra, grads[2:], strict=True))
    names = (
        tokenizer.convert_ids_to_tokens(ids[0].tolist())
        if tokenizer is not None
        else [str(i) for i in ids[0].tolist()]
    )
    return SimilarityExplanation(
        score=float(value.detach()),
        tokens=names,
        token_relevance=tokens_rel.detach(),
        images=ImageRelevance(channels.detach(), leaf.detach().cpu(), patch_size(model)),
        position_relevance=positions,
        rules=preset,
        pairs=None if second is None else second[0],
        pair_position_relevance=None if second is None else second[1],
    )


def _per_dimension(
    embedding: Tensor, leaf: Tensor, extra: list[Tensor], chunk: int, reduce: Any
) -> tuple[Tensor, Tensor]:
    """``(D, ...)`` relevance of each output ``embedding[d]`` at ``leaf`` (reduced by ``reduce``
    from ``(rows, *leaf.shape)``), and ``(D,)`` what the position tables among ``extra`` get of it:
    batched backward passes through the retained graph, ``chunk`` dimensions at a time."""
    n = embedding.shape[-1]
    eye = torch.eye(n, dtype=embedding.dtype, device=embedding.device)
    maps: list[Tensor] = []
    positions: list[Tensor] = []
    for start in range(0, n, chunk):
        rows = eye[start : start + chunk]
        grads = torch.autograd.grad(
            embedding, [leaf, *extra], rows, is_grads_batched=True, retain_graph=True, allow_unused=True
        )
        maps.append(reduce(acc(leaf.detach())[None] * acc(grads[0])).cpu())
        got = torch.zeros(len(rows), dtype=maps[-1].dtype)
        for x, g in zip(extra, grads[1:], strict=True):
            if g is not None:
                got += (acc(x.detach())[None] * acc(g)).flatten(1).sum(-1).cpu()
        positions.append(got)
    return torch.cat(maps), torch.cat(positions)


def _pairs(
    image_side: tuple[Tensor, Tensor], text_side: tuple[Tensor, Tensor], scale: float, text_inputs: dict
) -> tuple[Tensor, float]:
    """BiLRP's ``(patch rows, patch cols, tokens)`` pair relevance and the share of the pairs that
    involve a position table (on either side)."""
    image, image_pos = image_side
    text, text_pos = text_side
    mask = text_inputs.get("attention_mask")
    if mask is not None:
        text = text * mask[0].cpu().to(text.dtype)
    pairs = scale * torch.einsum("dhw,dt->hwt", image, text)
    image_total, text_total = image.flatten(1).sum(-1), text.sum(-1)
    positional = scale * float((image_total * text_pos + image_pos * text_total + image_pos * text_pos).sum())
    return pairs, positional
