"""Explaining a HuggingFace ``pipeline``: what it printed, from the inputs it built.

``lxt_plus.explain(pipe, text)`` runs the pipeline once, reads the answer it returned (the label,
the generated token, the token that fills the mask), and explains that answer on the model inputs
the pipeline itself prepares (its own tokenisation and image preprocessing), so the relevance
belongs to exactly what the user saw. The pipeline and its model are left as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lxt_plus.errors import InputError, TargetError, UnsupportedModelError

__all__ = ["is_pipeline", "resolve_pipeline", "PipelineCall", "PIPELINE_TASKS"]

PIPELINE_TASKS = ("text-classification", "text-generation", "fill-mask", "image-classification")
_ALIASES = {"sentiment-analysis": "text-classification"}


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a transformers ``Pipeline`` (checked without importing transformers first)."""
    import sys

    module = sys.modules.get("transformers.pipelines.base")
    return module is not None and isinstance(obj, module.Pipeline)


def _task(pipe: Any) -> str:
    task = _ALIASES.get(getattr(pipe, "task", ""), getattr(pipe, "task", ""))
    if task in PIPELINE_TASKS:
        return task
    raise UnsupportedModelError(
        f"lxt_plus explains {', '.join(PIPELINE_TASKS)} pipelines, not {task or type(pipe).__name__!r}; "
        "explain its model directly: lxt_plus.explain(pipe.model, inputs, tokenizer=pipe.tokenizer)"
    )


def _label_id(pipe: Any, label: str) -> int:
    label2id = getattr(pipe.model.config, "label2id", None) or {}
    if label in label2id:
        return int(label2id[label])
    id2label = getattr(pipe.model.config, "id2label", None) or {}
    for i, name in id2label.items():
        if name == label:
            return int(i)
    raise TargetError(f"the pipeline returned label {label!r}, which the model's config does not list")


def _model_inputs(pipe: Any, inputs: Any, kwargs: dict[str, Any]) -> dict[str, Tensor]:
    """The tensors the pipeline feeds its model for ``inputs``, from its own preprocessing."""
    preprocess, _, _ = pipe._sanitize_parameters(**kwargs)
    prepared = pipe.preprocess(inputs, **preprocess)
    return {k: v for k, v in dict(prepared).items() if isinstance(v, Tensor)}


def _answer(
    pipe: Any, task: str, inputs: Any, model_inputs: dict[str, Tensor], kwargs: dict[str, Any]
) -> Any:
    """The explained target: a label id, a generated token id, or a function of the output."""
    if task in ("text-classification", "image-classification"):
        out = pipe(inputs, **kwargs)
        top = out[0] if isinstance(out, list) else out
        if isinstance(top, list):  # text-classification with top_k: a list per input
            top = top[0]
        return _label_id(pipe, top["label"])
    if task == "text-generation":
        call = {
            k: v for k, v in kwargs.items() if k not in ("return_text", "return_full_text", "return_type")
        }
        out = pipe(inputs, **{**call, "return_tensors": True})
        ids = list(out[0]["generated_token_ids"])
        start = model_inputs["input_ids"].shape[-1]
        if len(ids) <= start:
            raise TargetError("the pipeline generated no token: there is nothing to explain")
        return int(ids[start])
    # fill-mask: the best token for the one masked position
    mask_id = getattr(pipe.tokenizer, "mask_token_id", None)
    where = [i for i, t in enumerate(model_inputs["input_ids"][0].tolist()) if t == mask_id]
    if len(where) != 1:
        raise InputError(
            f"the text has {len(where)} mask tokens ({pipe.tokenizer.mask_token!r}); lxt_plus explains a "
            "fill-mask pipeline on a text with exactly one"
        )
    out = pipe(inputs, **kwargs)
    token, position = int(out[0]["token"]), where[0]

    def filled(output: Any, positions: list[int]) -> Tensor:
        return output.logits[:, position, token]

    filled.__name__ = f"logit of {out[0]['token_str']!r} at the mask"
    filled.position = position  # type: ignore[attr-defined]
    return filled


@dataclass(frozen=True)
class PipelineCall:
    """The :func:`lxt_plus.explain` call that explains a pipeline's answer: its model, the one row of
    model inputs the pipeline prepared, the answer as target, and (fill-mask) the masked position."""

    model: Any
    inputs: dict[str, Tensor]
    target: Any
    tokenizer: Any
    position: int | None


def resolve_pipeline(
    pipe: Any, inputs: Any, target: Any = None, pipeline_kwargs: dict[str, Any] | None = None
) -> PipelineCall:
    """Run the pipeline once and say which explain call explains what it returned.

    Parameters
    ----------
    pipe:
        A ``text-classification`` (``sentiment-analysis``), ``text-generation``, ``fill-mask`` or
        ``image-classification`` pipeline.
    inputs:
        One input, as the pipeline takes it: a text (or chat messages) or an image.
    target:
        ``None`` for the pipeline's answer: its top label, its first generated token, or the best
        token for the mask. Anything :func:`lxt_plus.explain` takes as a target otherwise.
    pipeline_kwargs:
        Keyword arguments of the pipeline call, e.g. ``{"max_new_tokens": 1}`` or ``{"top_k": 3}``.

    Returns
    -------
    PipelineCall
        :func:`lxt_plus.explain` on its fields equals explaining the pipeline.
    """
    task = _task(pipe)
    if isinstance(inputs, (list, tuple)) and inputs and not isinstance(inputs[0], dict):
        raise InputError("explain one pipeline input at a time (a list of inputs: call explain for each)")
    call = dict(pipeline_kwargs or {})
    model_inputs = _model_inputs(pipe, inputs, call)
    if target is None:
        target = _answer(pipe, task, inputs, model_inputs, call)
    name = "pixel_values" if "pixel_values" in model_inputs else "input_ids"
    if model_inputs[name].shape[0] != 1:
        raise InputError(f"the pipeline prepared {model_inputs[name].shape[0]} model inputs; explain one")
    single = {k: v[0] for k, v in model_inputs.items() if k in (name, "attention_mask")}  # one row
    position = getattr(target, "position", None)  # fill-mask: the masked position
    return PipelineCall(pipe.model, single, target, getattr(pipe, "tokenizer", None), position)
