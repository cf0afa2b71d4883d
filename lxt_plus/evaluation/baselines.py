"""Attribution baselines that LRP is measured against, all behind one interface.

A *method* is any callable ``(model, input_ids, attention_mask, target_ids) -> relevance`` with
``input_ids`` and ``attention_mask`` of shape ``(batch, seq)``, ``target_ids`` of shape
``(batch,)`` (the next-token id for a causal LM, the class index for a classifier) and a
``(batch, seq)`` relevance tensor as result, 0 at padding. The explained output is the logit of
the target at the last real token (causal LM) or the class logit (classifier).

Methods here: Gradient×Input (the ``"gradient"`` preset), Integrated Gradients (Sundararajan
et al. 2017), attention rollout (Abnar & Zuidema 2020), last-layer attention and a seeded random
attribution.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lxt_plus.api.explain import explain, explaining, frozen_eval
from lxt_plus.engine.detect import accepts, input_device, is_hf_model
from lxt_plus.engine.functional import acc
from lxt_plus.engine.plan import Preset, get_preset
from lxt_plus.errors import InputError

__all__ = [
    "Method",
    "BASELINES",
    "output_logits",
    "rowwise",
    "explain_with_preset",
    "gradient_x_input",
    "integrated_gradients",
    "attention_rollout",
    "last_layer_attention",
    "random_method",
    "eager_attention",
]

Method = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


def _input_embeddings(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Module):
        raise InputError(
            f"{type(model).__name__} has no get_input_embeddings(): perturbation and gradient "
            "baselines need a model that embeds token ids and accepts inputs_embeds="
        )
    return emb


def embed(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Token embeddings ``(batch, seq, d_model)`` of ``input_ids``, detached."""
    emb = _input_embeddings(model)
    with torch.no_grad():
        return emb(input_ids.to(input_device(emb))).detach()


def output_logits(model: nn.Module, inputs_embeds: Tensor) -> Tensor:
    """Logits ``(batch, n_out)`` of the explained position for unpadded rows ``(batch, seq, d)``.

    Causal LMs: the next-token logits at the last token (``logits_to_keep=1`` skips the vocabulary
    projection elsewhere). Classifiers and plain modules returning ``(batch, n_out)``: the logits.
    """
    kwargs: dict[str, Any] = {"inputs_embeds": inputs_embeds}
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    if accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)):
        logits = out[0]
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        raise InputError(
            f"{type(model).__name__}(inputs_embeds=...) must return logits of shape "
            f"(batch, n_out) or (batch, seq, vocab), got {type(out).__name__}"
        )
    return logits[:, -1] if logits.dim() == 3 else logits


def rowwise(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Lift a one-row method ``fn(model, input_ids (1, n), target (1,), **kw) -> (n,)`` to a batched
    :data:`Method`: padding is stripped per row and gets relevance 0."""

    @functools.wraps(fn)
    def run(
        model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, target_ids: Tensor, **kwargs: Any
    ) -> Tensor:
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
        targets = torch.as_tensor(target_ids).reshape(-1)
        out = torch.zeros(ids.shape, dtype=torch.float32)
        for r in range(ids.shape[0]):
            keep = mask[r].bool().cpu()
            rel = fn(model, ids[r, keep][None], targets[r : r + 1], **kwargs)
            out[r, keep] = rel.detach().reshape(-1).float().cpu()
        return out

    return run


# ------------------------------------------------------------------------------ LRP presets
def explain_with_preset(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_ids: Tensor,
    rules: str | Preset,
    contrast_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """LRP relevance ``(batch, seq)`` with a preset, and the conservation error ``(batch,)``;
    with ``contrast_ids``, of ``logit(target) − logit(contrast)``.

    The conservation error is ``|Σ R − logit| / |logit|``, where relevance landing on position or
    token-type embeddings counts as conserved. HF models go through :func:`lxt_plus.explain`;
    plain modules (taking ``inputs_embeds=``) through the same patching on their embeddings.
    """

    preset = get_preset(rules)
    targets = [int(t) for t in torch.as_tensor(target_ids).reshape(-1)]
    foils = None if contrast_ids is None else [int(t) for t in torch.as_tensor(contrast_ids).reshape(-1)]
    if is_hf_model(model):
        e = explain(
            model, input_ids, target=targets, contrast=foils, attention_mask=attention_mask, rules=preset
        )
        absorbed = e.conservation["absorbed"]
        return e.batch_relevance.float(), (absorbed.abs() / e.target_logit.abs().clamp_min(1e-12)).float()
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(ids.shape)
    rel, err = torch.zeros(ids.shape), torch.zeros(ids.shape[0])
    with explaining(model, preset):
        for r in range(ids.shape[0]):
            keep = mask[r].bool()
            x = embed(model, ids[r, keep][None]).requires_grad_(True)
            out = output_logits(model, x)[0]
            logit = out[targets[r]] - (out[foils[r]] if foils is not None else 0.0)
            (grad,) = torch.autograd.grad(logit, x)
            row = (acc(x.detach()) * acc(grad)).sum(-1)[0]
            rel[r, keep.cpu()] = row.float().cpu()
            err[r] = float((row.sum() - logit.detach()).abs() / logit.detach().abs().clamp_min(1e-12))
    return rel, err


def gradient_x_input(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_ids: Tensor
) -> Tensor:
    """Plain Gradient×Input (Shrikumar et al. 2016): the ``"gradient"`` preset, ``(batch, seq)``."""
    return explain_with_preset(model, input_ids, attention_mask, target_ids, "gradient")[0]


# ------------------------------------------------------------------------------ integrated gradients
@rowwise
def _integrated_gradients(
    model: nn.Module, ids: Tensor, target: Tensor, steps: int = 32, batch_size: int = 16
) -> Tensor:
    x = embed(model, ids)  # (1, n, d)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps  # midpoint rule
    total = torch.zeros_like(acc(x))
    with frozen_eval(model):
        for chunk in alphas.split(batch_size):
            scaled = (chunk[:, None, None] * x).requires_grad_(True)
            logit = output_logits(model, scaled)[:, int(target[0])]
            (grad,) = torch.autograd.grad(logit.sum(), scaled)
            total += acc(grad).sum(0, keepdim=True)
    return (acc(x) * total / steps).sum(-1)[0]


def integrated_gradients(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_ids: Tensor,
    *,
    steps: int = 32,
    batch_size: int = 16,
) -> Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) from the all-zero embedding, ``(batch, seq)``.

    ``R_i = x_i · (1/m) Σ_j ∂f(α_j x)/∂x_i`` with midpoints ``α_j = (j + ½)/m`` (Riemann sum),
    evaluated ``batch_size`` steps per forward. Completeness: ``Σ R ≈ f(x) − f(0)``.
    """
    if steps < 1 or batch_size < 1:
        raise InputError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    return _integrated_gradients(
        model, input_ids, attention_mask, target_ids, steps=steps, batch_size=batch_size
    )


# ------------------------------------------------------------------------------ attention
@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a HF model to eager attention (so attention weights are returned); restored on exit."""
    config = getattr(model, "config", None)
    if not is_hf_model(model) or config is None:
        raise InputError(
            f"attention baselines need a transformers model that returns attention weights, "
            f"got {type(model).__name__}"
        )
    hf: Any = model
    previous = config._attn_implementation
    if previous != "eager":
        hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            hf.set_attn_implementation(previous)


def _attentions(model: nn.Module, ids: Tensor) -> list[Tensor]:
    """Per-layer attention weights ``(heads, seq, seq)`` of one unpadded row, float."""
    device = input_device(model)
    with eager_attention(model), frozen_eval(model), torch.no_grad():
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "output_attentions": True}
        if accepts(model, "use_cache"):
            kwargs["use_cache"] = False
        out = model(**kwargs)
    atts = getattr(out, "attentions", None)
    if not atts or any(a is None for a in atts):
        raise InputError(f"{type(model).__name__} returned no attention weights with output_attentions=True")
    return [a[0].float().cpu() for a in atts]


def _query_position(att: Tensor) -> int:
    """The position that reads the sequence: the last token under causal attention, else the first
    (the ``[CLS]`` token an encoder classifier pools)."""
    causal = att.shape[-1] > 1 and float(att[:, 0, 1:].abs().sum()) == 0.0
    return att.shape[-1] - 1 if causal else 0


@rowwise
def _rollout(model: nn.Module, ids: Tensor, target: Tensor) -> Tensor:
    atts = _attentions(model, ids)
    eye = torch.eye(ids.shape[1])
    roll = eye
    for att in atts:
        a = 0.5 * att.mean(0) + 0.5 * eye  # the residual stream as an extra identity "head"
        roll = (a / a.sum(-1, keepdim=True)) @ roll
    return roll[_query_position(atts[0])]


def attention_rollout(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_ids: Tensor
) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020), ``(batch, seq)``.

    Head-averaged attention plus the identity for the residual, row-normalised, multiplied over
    layers; the row of the reading position (last token for causal models, ``[CLS]`` otherwise).
    Class-agnostic: ``target_ids`` is ignored.
    """
    return _rollout(model, input_ids, attention_mask, target_ids)


@rowwise
def _last_layer(model: nn.Module, ids: Tensor, target: Tensor) -> Tensor:
    atts = _attentions(model, ids)
    return atts[-1].mean(0)[_query_position(atts[0])]


def last_layer_attention(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_ids: Tensor
) -> Tensor:
    """Attention of the reading position in the last layer, averaged over heads, ``(batch, seq)``."""
    return _last_layer(model, input_ids, attention_mask, target_ids)


def random_method(seed: int = 0) -> Method:
    """Uniform random relevance from a generator seeded once: a different draw per call."""
    gen = torch.Generator().manual_seed(seed)

    def random(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, target_ids: Tensor) -> Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return torch.rand(input_ids.shape, generator=gen) * mask.cpu().float()

    return random


BASELINES: dict[str, Callable[..., Method]] = {
    "integrated_gradients": lambda seed=0, **kw: functools.partial(integrated_gradients, **kw),
    "attention_rollout": lambda seed=0: attention_rollout,
    "last_layer_attention": lambda seed=0: last_layer_attention,
    "random": lambda seed=0: random_method(seed),
}
"""Baseline name -> factory ``(seed=0, **options) -> Method``."""
