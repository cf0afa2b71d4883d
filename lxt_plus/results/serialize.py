"""Explanations to and from plain JSON-serialisable dictionaries."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from lxt_plus.errors import InputError
from lxt_plus.results.images import ImageRelevance

if TYPE_CHECKING:
    from lxt_plus.results.result import Explanation, GenerationExplanation

__all__ = [
    "FORMAT_VERSION",
    "explanation_to_dict",
    "explanation_fields",
    "generation_to_dict",
    "generation_fields",
]

FORMAT_VERSION = 1
_EXPLANATION = "lxt_plus.Explanation"
_GENERATION = "lxt_plus.GenerationExplanation"


def _list(t: torch.Tensor | None) -> Any:
    if t is None:
        return None
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).tolist()


def _encode(value: Any, where: str) -> Any:
    """Captures as JSON: tensors become ``{"__tensor__": data, "dtype": ..., "shape": ...}``."""
    if isinstance(value, torch.Tensor):
        return {
            "__tensor__": _list(value),
            "dtype": str(value.dtype).removeprefix("torch."),
            "shape": list(value.shape),
        }
    if isinstance(value, dict):
        return {str(k): _encode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise InputError(
        f"cannot serialise {where} of type {type(value).__name__}; captures may hold tensors, "
        f"numbers, strings, lists and dicts"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        dtype = getattr(torch, str(value.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise InputError(f"unknown tensor dtype {value.get('dtype')!r} in captures")
        return torch.tensor(value["__tensor__"], dtype=dtype).reshape(value.get("shape", [-1]))
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def explanation_to_dict(exp: Explanation) -> dict[str, Any]:
    """An :class:`~lxt_plus.results.result.Explanation` as a JSON-serialisable dict.

    Tensors become (nested) lists, targets dicts of their fields; ``format`` and ``version`` identify
    the layout for :func:`~lxt_plus.results.result.explanation_from_dict`.
    """
    return {
        "format": _EXPLANATION,
        "version": FORMAT_VERSION,
        "rules": exp.rules,
        "single": exp.single,
        "modality": exp.modality,
        "tokens": [list(row) for row in exp.tokens],
        "relevance": _list(exp.batch_relevance),
        "token_ids": _list(exp.token_ids),
        "attention_mask": _list(exp.attention_mask),
        "targets": [
            {**asdict(t), "ids": list(t.ids), "contrast_ids": list(t.contrast_ids)} for t in exp.targets
        ],
        "target_logit": _list(exp.target_logit),
        "probability": _list(exp.probability),
        "extra_relevance": _list(exp.extra_relevance),
        "positional_relevance": _list(exp.positional_relevance),
        "positional_layers": _list(exp.positional_layers),
        "pairs": exp.pairs,
        "hidden": _list(exp.hidden),
        "captures": _encode(dict(exp.captures), "captures"),
        "images": None
        if exp.images is None
        else {
            "channels": _list(exp.images.channels),
            "pixels": _list(exp.images.pixels),
            "patch_size": exp.images.patch_size,
            "rows": _list(exp.images.rows),
        },
    }


def _check(data: Any, kind: str, required: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise InputError(f"expected a dict from {kind}.to_dict(), got {type(data).__name__}")
    name = _EXPLANATION if kind == "Explanation" else _GENERATION
    if data.get("format") != name:
        raise InputError(f"not a serialised {kind}: format is {data.get('format')!r}, expected {name!r}")
    if data.get("version") != FORMAT_VERSION:
        raise InputError(
            f"unsupported {kind} format version {data.get('version')!r}; this lxt_plus reads "
            f"version {FORMAT_VERSION}"
        )
    missing = [k for k in required if k not in data]
    if missing:
        raise InputError(f"serialised {kind} is missing the field(s) {', '.join(missing)}")


def _tensor(data: dict[str, Any], key: str, dtype: torch.dtype, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    try:
        return torch.tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"field {key!r} is not a rectangular list of numbers: {exc}") from exc


def _target(t: Any) -> dict[str, Any]:
    if not isinstance(t, dict):
        raise InputError(f"each target must be a dict of Target fields, got {type(t).__name__}")
    try:
        return dict(
            kind=str(t["kind"]),
            ids=tuple(int(i) for i in t["ids"]),
            label=str(t["label"]),
            position=None if t.get("position") is None else int(t["position"]),
            contrast_ids=tuple(int(i) for i in t.get("contrast_ids", ())),
            contrast_label=t.get("contrast_label"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"malformed target {t!r}: {exc!r}") from exc


def explanation_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of the :class:`~lxt_plus.results.result.Explanation` that
    :func:`explanation_to_dict` wrote (``targets``: one dict of ``Target`` fields each); see
    :func:`~lxt_plus.results.result.explanation_from_dict`, which says the dtypes and errors.
    """
    _check(data, "Explanation", ("rules", "tokens", "relevance", "targets", "target_logit"))
    relevance = _tensor(data, "relevance", torch.float32)
    if relevance.dim() < 2:
        raise InputError(f"field 'relevance' must be (batch, ...), got shape {tuple(relevance.shape)}")
    batch = relevance.shape[0]
    tokens, targets = data["tokens"], data["targets"]
    if not isinstance(tokens, list) or not all(isinstance(r, list) for r in tokens) or len(tokens) != batch:
        raise InputError(f"field 'tokens' must be a list of {batch} token list(s)")
    if not isinstance(targets, list) or len(targets) != batch:
        raise InputError(f"field 'targets' must be a list of {batch} target(s)")
    target_logit = _tensor(data, "target_logit", torch.float32)
    if target_logit.shape != (batch,):
        raise InputError(
            f"field 'target_logit' must have {batch} value(s), got shape {tuple(target_logit.shape)}"
        )
    return dict(
        batch_relevance=relevance,
        tokens=[[str(t) for t in row] for row in tokens],
        token_ids=_tensor(data, "token_ids", torch.long, optional=True),
        attention_mask=_tensor(data, "attention_mask", torch.long, optional=True),
        targets=[_target(t) for t in targets],
        target_logit=target_logit,
        probability=_tensor(data, "probability", torch.float32, optional=True),
        rules=str(data["rules"]),
        single=bool(data.get("single", batch == 1)),
        modality=str(data.get("modality", "tokens")),
        captures=_decode(data.get("captures") or {}),
        extra_relevance=_tensor(data, "extra_relevance", torch.float32, optional=True),
        positional_relevance=_tensor(data, "positional_relevance", torch.float32, optional=True),
        positional_layers=_tensor(data, "positional_layers", torch.float32, optional=True),
        pairs=bool(data.get("pairs", False)),
        hidden=_tensor(data, "hidden", torch.bool, optional=True),
        images=_images(data.get("images")),
    )


def _images(data: Any) -> ImageRelevance | None:
    if data is None:
        return None
    if not isinstance(data, dict) or not {"channels", "pixels"} <= set(data):
        raise InputError("field 'images' must be a dict with 'channels' and 'pixels'")
    channels = _tensor(data, "channels", torch.float32)
    pixels = _tensor(data, "pixels", torch.float32)
    if channels.dim() != 4 or channels.shape != pixels.shape:
        raise InputError(
            f"images: 'channels' and 'pixels' must both be (images, C, H, W), got {tuple(channels.shape)} "
            f"and {tuple(pixels.shape)}"
        )
    size = data.get("patch_size")
    return ImageRelevance(
        channels,
        pixels,
        int(size) if size is not None else None,
        _tensor(data, "rows", torch.long, optional=True),
    )


def generation_to_dict(gen: GenerationExplanation) -> dict[str, Any]:
    """A :class:`~lxt_plus.results.result.GenerationExplanation` as a JSON-serialisable dict."""
    return {
        "format": _GENERATION,
        "version": FORMAT_VERSION,
        "rules": gen.rules,
        "tokens": list(gen.tokens),
        "token_ids": _list(gen.token_ids),
        "prompt_length": gen.prompt_length,
        "matrix": _list(gen.matrix),
        "target_logit": _list(gen.target_logit),
    }


def generation_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of the :class:`~lxt_plus.results.result.GenerationExplanation` that
    :func:`generation_to_dict` wrote; see :func:`~lxt_plus.results.result.generation_from_dict`."""
    _check(
        data,
        "GenerationExplanation",
        ("rules", "tokens", "token_ids", "prompt_length", "matrix", "target_logit"),
    )
    tokens, n = data["tokens"], len(data["tokens"]) if isinstance(data["tokens"], list) else -1
    matrix = _tensor(data, "matrix", torch.float32)
    if n < 0 or not isinstance(data["prompt_length"], int) or matrix.dim() != 2 or matrix.shape[1] != n:
        raise InputError(
            f"serialised generation does not fit together: {n} tokens, prompt_length "
            f"{data['prompt_length']!r}, matrix shape {tuple(matrix.shape)}"
        )
    return dict(
        tokens=[str(t) for t in tokens],
        token_ids=_tensor(data, "token_ids", torch.long),
        prompt_length=data["prompt_length"],
        matrix=matrix,
        target_logit=_tensor(data, "target_logit", torch.float32),
        rules=str(data["rules"]),
    )
