"""``explain``: inputs and targets in, one forward and one backward pass, an :class:`Explanation` out."""

from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from lxt_plus.api.pipelines import is_pipeline, resolve_pipeline
from lxt_plus.engine.attention import replay_contexts
from lxt_plus.engine.detect import (
    accepts,
    decoder_start,
    embedding_leaves,
    image_shape,
    input_device,
    is_hf_model,
    is_position_embedding,
    patch_size,
    precut_patch_layout,
    require_module,
)
from lxt_plus.engine.functional import acc, input_relevance
from lxt_plus.engine.memory import check_fits
from lxt_plus.engine.offload import offloaded_saves
from lxt_plus.engine.patching import Handle, check_images, check_plain, handle_of, patch
from lxt_plus.engine.plan import Preset, get_preset
from lxt_plus.engine.positional import position_buffer_leaves, positional_leaves, positional_relevance
from lxt_plus.errors import (
    ContextTooLongError,
    InputError,
    LxtPlusError,
    LxtPlusWarning,
    NumericalError,
    OutOfMemoryError,
    TargetError,
    TokenizerMismatchError,
    UnsupportedModelError,
)
from lxt_plus.results.images import ImageRelevance, patch_list_images
from lxt_plus.results.result import Explanation, Target

__all__ = [
    "explain",
    "model_kind",
    "prepare_text",
    "resolve_token",
    "frozen_parameters",
    "frozen_eval",
    "explaining",
    "image_input_errors",
]


def model_kind(model: nn.Module) -> str:
    """``"causal-lm"``, ``"classifier"`` (sequence or image) or ``"plain"``."""
    if not is_hf_model(model):
        return "plain"
    name = type(model).__name__
    if "ForCausalLM" in name or "LMHead" in name or name.endswith("ForConditionalGeneration"):
        return "causal-lm"
    if "Classification" in name:
        return "classifier"
    if getattr(model, "get_output_embeddings", lambda: None)() is not None:
        return "causal-lm"
    raise UnsupportedModelError(
        f"{name} has no task head lxt_plus knows how to target: explain a "
        "...ForCausalLM, ...ForSequenceClassification or ...ForImageClassification model"
    )


# ------------------------------------------------------------------------------------ inputs
@dataclass
class _Batch:
    input_ids: Tensor | None
    attention_mask: Tensor | None
    values: Tensor | None  # pixels or features
    single: bool
    hidden: Tensor | None = None  # special / chat-template tokens
    # further model inputs beside the ids (a processor's pixel_values, image_sizes, ...)
    model_inputs: dict[str, Any] = field(default_factory=dict)


def _hidden_mask(tokenizer: Any, texts: list[str], templated: list[str], ids: Tensor) -> Tensor:
    """True for special tokens and, with a chat template, for tokens outside the user's own text."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    hidden = torch.tensor([[i in special for i in row] for row in ids.tolist()], dtype=torch.bool)
    if templated == texts:
        return hidden
    enc = tokenizer(templated, padding=True, add_special_tokens=False, return_offsets_mapping=True)
    for r, (text, full) in enumerate(zip(texts, templated, strict=True)):
        start = full.rfind(text)
        end = start + len(text)
        for c, (a, b) in enumerate(enc["offset_mapping"][r]):
            if b > a and (start < 0 or b <= start or a >= end):
                hidden[r, c] = True
    return hidden


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prepare_text(
    tokenizer: Any,
    texts: list[str],
    model: nn.Module | None = None,
    chat: bool = False,
    with_hidden: bool = False,
) -> Any:
    """Tokenise with padding; empty texts and texts longer than the model's positions are errors."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, expected str")
        if not t.strip():
            raise InputError(f"text {i} is empty or whitespace only: there is nothing to explain")
    raw = texts
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise InputError("chat=True needs a tokenizer with a chat template")
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
            )
            for t in texts
        ]
    if getattr(tokenizer, "pad_token", None) is None and len(texts) > 1:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if model is not None:
        check_ids(model, ids, vocabulary=False)
    if with_hidden:
        try:
            hidden = _hidden_mask(tokenizer, raw, texts, ids)
        except (NotImplementedError, ValueError, KeyError, TypeError):  # slow tokenizers: no offsets
            hidden = None
        return ids, mask, hidden
    return ids, mask


_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _prepare_multimodal(
    model: nn.Module, data: dict[str, Any], tokenizer: Any, mask: Tensor | None
) -> _Batch:
    """Token ids with images (a processor's output for a vision-language model): the ids are
    explained as text, and ``pixel_values`` becomes a leaf of its own (``Explanation.images``)."""
    ids = data["input_ids"]
    if not isinstance(ids, Tensor) or ids.is_floating_point():
        raise InputError("input_ids must be an integer tensor")
    pixels = data["pixel_values"]
    if not isinstance(pixels, Tensor):
        raise InputError(f"pixel_values must be a floating-point tensor, got {type(pixels).__name__}")
    single = ids.dim() == 1
    ids = ids[None] if single else ids
    image_owners(model, pixels, ids.shape[0], image_grid(data))  # refused before the forward pass
    mask = data.get("attention_mask", mask)
    mask = torch.ones_like(ids) if mask is None else (mask[None] if mask.dim() == 1 else mask)
    check_ids(model, ids, length=0)
    hidden = None
    if tokenizer is not None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        hidden = torch.tensor([[i in special for i in row] for row in ids.tolist()], dtype=torch.bool)
    extras = {k: v for k, v in data.items() if k not in _TEXT_KEYS and v is not None}
    return _Batch(ids, mask.long(), None, single, hidden, extras)


def _processed(model: nn.Module, text: Any, images: Any, processor: Any, tokenizer: Any) -> tuple[Any, Any]:
    """``processor(text=..., images=...)`` as model inputs, and the tokenizer for the token strings."""
    if images is None or processor is None or not callable(processor):
        raise InputError("images= and processor= go together: pass both (the processor prepares the images)")
    if getattr(model, "main_input_name", "input_ids") != "input_ids":  # an image classifier
        if text is not None:
            raise InputError(f"{type(model).__name__} takes images only: pass None as the text")
        return dict(processor(images=images, return_tensors="pt")), tokenizer
    if not isinstance(text, (str, list)):
        raise InputError("a vision-language model needs the prompt text beside images=")
    data = dict(processor(text=text, images=images, return_tensors="pt"))
    return data, tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)


_PATCH_LIST_KEYS = ("pixel_attention_mask", "spatial_shapes")


def _prepare_patch_lists(model: nn.Module, data: dict[str, Any]) -> _Batch:
    """SigLIP2's image processor output: patch lists ``(batch, patches, P·P·C)`` with
    ``pixel_attention_mask`` and ``spatial_shapes``; the pixels are the leaf, and relevance goes
    back onto the image grid (every row's grid the same)."""
    pixels, shapes = data["pixel_values"], data["spatial_shapes"]
    if not isinstance(pixels, Tensor) or not pixels.is_floating_point() or pixels.dim() != 3:
        raise InputError(
            f"{type(model).__name__} takes pixel_values as patch lists (batch, patches, values), got "
            f"{tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__}"
        )
    _patch_list_grid(model, pixels, torch.as_tensor(shapes))
    extras = {k: data[k] for k in _PATCH_LIST_KEYS if data.get(k) is not None}
    return _Batch(None, None, pixels, False, model_inputs=extras)


def check_image(model: nn.Module, values: Tensor) -> None:
    """An image batch the model can read: ``(batch, channels, height, width)`` with its channels
    (transformers would raise a ValueError from inside the model otherwise)."""
    if accepts(model, "spatial_shapes"):
        raise InputError(
            f"{type(model).__name__} takes images as patch lists: pass its image processor's output (a dict "
            "with pixel_values, pixel_attention_mask and spatial_shapes)"
        )
    if values.dim() != 4:
        raise InputError(
            f"{type(model).__name__} takes images as (batch, channels, height, width) or (channels, height, "
            f"width), got a tensor of shape {tuple(values.shape)}"
        )
    channels = image_shape(model)[0]
    if values.shape[1] != channels:
        raise InputError(
            f"{type(model).__name__} takes images with {channels} channel(s), got {values.shape[1]} "
            f"(shape {tuple(values.shape)}); convert the images (e.g. to RGB or grayscale) or use its processor"
        )


def _prepare(
    model: nn.Module, inputs: Any, tokenizer: Any, attention_mask: Tensor | None, kind: str, chat: bool
) -> _Batch:
    if isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs)
    ):
        if tokenizer is None:
            raise InputError("text input needs tokenizer=...; or pass input_ids as a tensor")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        side = tokenizer.padding_side
        if kind == "classifier" and not _reads_last_token(model):
            tokenizer.padding_side = "right"  # BERT-style classifiers read position 0
        try:
            ids, mask, hidden = prepare_text(tokenizer, texts, model, chat=chat, with_hidden=True)
        finally:
            tokenizer.padding_side = side
        check_ids(model, ids, length=0)
        return _Batch(ids, mask, None, isinstance(inputs, str), hidden)
    if isinstance(inputs, (list, tuple)) and not inputs:
        raise InputError("an empty list of inputs: there is nothing to explain")
    if isinstance(inputs, dict) or hasattr(inputs, "keys"):
        data = dict(inputs)
        if "input_ids" in data and "pixel_values" in data:  # a vision-language model's processor output
            return _prepare_multimodal(model, data, tokenizer, attention_mask)
        if "pixel_values" in data and "spatial_shapes" in data:  # SigLIP2's patch lists
            return _prepare_patch_lists(model, data)
        if "pixel_values" in data:
            inputs = data["pixel_values"]
        elif "input_ids" in data:
            inputs = data["input_ids"]
            attention_mask = data.get("attention_mask", attention_mask)
        else:
            raise InputError(f"an input mapping needs 'input_ids' or 'pixel_values', got keys {sorted(data)}")
    if not isinstance(inputs, Tensor):
        raise InputError(
            f"inputs must be text, a list of texts, a tensor or a tokenizer output, "
            f"got {type(inputs).__name__}"
        )
    if inputs.is_floating_point():
        if kind == "causal-lm" or getattr(model, "main_input_name", None) == "input_ids":
            raise InputError(
                f"{type(model).__name__} takes integer token ids, got a {inputs.dtype} tensor; "
                "pass input_ids (or text with tokenizer=...)"
            )
        single = is_hf_model(model) and inputs.dim() == 3 or not is_hf_model(model) and inputs.dim() == 1
        values = inputs[None] if single else inputs
        if is_hf_model(model) and getattr(model, "main_input_name", None) == "pixel_values":
            check_image(model, values)
        return _Batch(None, None, values, single)
    if getattr(model, "main_input_name", "input_ids") != "input_ids" or not is_hf_model(model):
        raise InputError(
            f"{type(model).__name__} takes float inputs, got an integer tensor of dtype {inputs.dtype}"
        )
    if inputs.dim() not in (1, 2) or inputs.shape[-1] == 0:
        raise InputError(
            f"input_ids must have shape (seq,) or (batch, seq) with seq > 0, got {tuple(inputs.shape)}"
        )
    single = inputs.dim() == 1
    ids = inputs[None] if single else inputs
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise InputError(
                f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}"
            )
    if bool((mask.sum(-1) == 0).any()):
        raise InputError("a row of the batch has no real token (its attention_mask is all zeros)")
    if kind == "classifier" and not _reads_last_token(model) and bool((mask[:, 0] == 0).any()):
        raise InputError(
            f"{type(model).__name__} classifies from the first position, but the batch is "
            "left-padded; pad on the right (tokenizer.padding_side = 'right')"
        )
    check_ids(model, ids)
    return _Batch(ids, mask, None, single)


def check_ids(
    model: nn.Module,
    ids: Tensor,
    *,
    vocabulary: bool = True,
    length: int | None = None,
    what: str = "the input",
) -> None:
    """Token ids the model can embed, and no more positions than it has.

    Raises :class:`~lxt_plus.errors.TokenizerMismatchError` for an id outside the vocabulary and
    :class:`~lxt_plus.errors.ContextTooLongError` when ``length`` (default: the last dimension of
    ``ids``) exceeds the model's maximum number of positions.
    """
    if vocabulary and ids.numel():
        vocab = cast(Any, model).get_input_embeddings().num_embeddings
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise TokenizerMismatchError(
                f"token id {bad} is outside {type(model).__name__}'s vocabulary of {vocab}: "
                "the tokenizer does not match the model"
            )
    limit = _max_positions(model)
    n = ids.shape[-1] if length is None else length
    if limit is not None and n > limit:
        raise ContextTooLongError(
            f"{what} has {n} tokens but {type(model).__name__} accepts at most {limit} positions; shorten it"
        )


def _reads_last_token(model: nn.Module) -> bool:
    """Decoder-style sequence classifiers pool the last real token (left padding is fine)."""
    cfg = getattr(model, "config", None)
    return (
        bool(getattr(cfg, "is_decoder", False))
        or type(model).__name__.endswith("ForSequenceClassification")
        and hasattr(model, "score")
    )


# ------------------------------------------------------------------------------------ targets
def resolve_token(
    tokenizer: Any, spec: str | int, vocab: int, what: str = "target", *, strict_target: bool = False
) -> tuple[tuple[int, ...], str]:
    """Token id(s) and a label for a token target given as an id or a string.

    A string that splits into several tokens (explained as the sum of their logits), lacks the
    leading space of its usual single-token form (``"Paris"`` for ``" Paris"``) or looks like a
    class label (``"POSITIVE"``) gives a :class:`~lxt_plus.errors.TargetWarning` naming the tokens,
    or a :class:`TargetError` with ``strict_target=True`` (see :mod:`lxt_plus.api.targets`).
    """
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TargetError(f"{what} must be a token id or a token string, got {spec!r}")
    if isinstance(spec, int):
        if not 0 <= spec < vocab:
            raise TargetError(f"{what} token id {spec} is out of range: valid ids are 0..{vocab - 1}")
        label = tokenizer.decode([spec]) if tokenizer is not None else str(spec)
        return (spec,), label
    if tokenizer is None:
        raise TargetError(f"a token string {what} ({spec!r}) needs tokenizer=...; or pass a token id")
    if spec == "":
        raise TargetError(f"{what} is an empty string: give a token like ' Paris'")
    ids = tuple(tokenizer.encode(spec, add_special_tokens=False))
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise TargetError(f"{what} {spec!r} is not in the tokenizer's vocabulary")
    if max(ids) >= vocab:
        raise TargetError(f"{what} {spec!r} maps to ids {ids} outside the model's vocabulary of {vocab}")
    from lxt_plus.api.targets import check_token_target

    check_token_target(tokenizer, spec, ids, what, strict=strict_target)
    return ids, spec


def _resolve_class(model: nn.Module, spec: int | str, num: int, what: str) -> tuple[tuple[int, ...], str]:
    id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise TargetError(f"{what} must be a class index or label name, got {spec!r}")
    if isinstance(spec, int):
        if not -num <= spec < num:
            raise TargetError(
                f"{what} class {spec} is out of range: the model has {num} classes "
                f"({', '.join(f'{i}={id2label.get(i, i)}' for i in range(num))})"
            )
        idx = spec % num
        return (idx,), id2label.get(idx, str(idx))
    by_name = {v.lower(): k for k, v in id2label.items()}
    if spec.lower() not in by_name:
        raise TargetError(f"unknown {what} label {spec!r}; valid labels: {', '.join(id2label.values())}")
    idx = by_name[spec.lower()]
    return (idx,), id2label[idx]


def _per_row(spec: Any, rows: int, what: str) -> list[Any]:
    if isinstance(spec, (list, tuple)) and not isinstance(spec, str):
        if len(spec) != rows:
            raise TargetError(f"{len(spec)} {what}s given for a batch of {rows} rows")
        return list(spec)
    return [spec] * rows


# ------------------------------------------------------------------------------------ context
@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No weight gradients while explaining; ``requires_grad`` flags are restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, flag in flags:
            if flag:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


@contextlib.contextmanager
def _eval_mode(model: nn.Module, keep_train: bool) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    try:
        if not keep_train and any(flag for _, flag in modes):
            model.eval()
        yield
    finally:
        for m, flag in modes:
            if m.training != flag:  # nn.Module.__setattr__ is slow: write only what changed
                m.training = flag


@contextlib.contextmanager
def frozen_eval(model: nn.Module, keep_train: bool = False) -> Iterator[None]:
    """Eval mode (unless ``keep_train``) and no weight gradients; both restored on exit."""
    with frozen_parameters(model), _eval_mode(model, keep_train):
        yield


@contextlib.contextmanager
def explaining(
    model: nn.Module, rules: str | Preset | dict[str, Any], strict: bool = True, keep_train: bool = False
) -> Iterator[Handle]:
    """Patch (unless already patched with the same preset), freeze weights, eval mode; undo all on exit."""
    preset = get_preset(rules)
    existing = handle_of(model)
    # reuse a patch with the same preset; another preset raises AlreadyPatchedError in patch()
    handle = (
        None if existing is not None and existing.preset == preset else patch(model, preset, strict=strict)
    )
    try:
        with frozen_eval(model, keep_train):
            yield handle if handle is not None else existing  # type: ignore[misc]
    finally:
        if handle is not None and handle.active:
            handle.remove()


@contextlib.contextmanager
def _memory_errors(batch: _Batch) -> Iterator[None]:
    """torch's out-of-memory errors (CPU allocator or CUDA) as one clear lxt_plus error."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc)
        if (
            not isinstance(exc, torch.OutOfMemoryError)
            and "can't allocate memory" not in text
            and "out of memory" not in text.lower()
        ):
            raise
        shape = tuple(batch.input_ids.shape) if batch.input_ids is not None else tuple(batch.values.shape)  # type: ignore[union-attr]
        raise OutOfMemoryError(
            f"explaining inputs of shape {shape} ran out of memory; pass checkpointing=True (recomputes "
            "layer activations in the backward pass), a smaller batch, or a shorter text"
        ) from None


@contextlib.contextmanager
def image_input_errors(model: nn.Module, images: bool) -> Iterator[None]:
    """A vision-language model's own refusal of ids and images that do not match (transformers
    raises ``ValueError`` from inside the model: placeholder tokens against image features) as one
    clear lxt_plus error with the fix."""
    try:
        yield
    except ValueError as exc:
        if isinstance(exc, LxtPlusError) or not images:
            raise
        raise InputError(
            f"{type(model).__name__} rejected the token ids with these images: {str(exc).splitlines()[0]}. "
            "The text must hold the image placeholder tokens the vision tower fills (as many as it gives "
            "features); prepare ids and images together with the model's processor"
        ) from None


def _check_fits(model: nn.Module, handle: Handle, batch: _Batch, checkpointing: bool) -> None:
    """Refuse up front an input whose backward pass cannot fit (estimate from the patch probe)."""
    report = handle.plan.operations
    if report is None or report.memory is None or batch.input_ids is None:
        return
    rows, tokens = batch.input_ids.shape[0], batch.input_ids.shape[-1]
    weight = next(model.parameters(), None)
    size = weight.element_size() if weight is not None and weight.is_floating_point() else 4
    device = input_device(model)
    check_fits(report.memory, getattr(model, "config", None), rows, tokens, size, device, checkpointing)


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """HF gradient checkpointing (needs train mode; DropoutOff keeps dropout off), undone on exit."""
    if not enabled:
        yield
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not support gradient checkpointing; explain without checkpointing=True"
        )
    new_api = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5.2x names
    was = bool(
        getattr(model, "is_activation_checkpointing" if new_api else "is_gradient_checkpointing", False)
    )
    modes = [(m, m.training) for m in model.modules()]
    hf = cast(Any, model)
    # non-reentrant, and the attention outputs of each layer's forward pass handed back to its
    # recomputation (attention.replay_contexts): the recomputation runs no attention kernel
    kwargs = {"use_reentrant": False, "context_fn": replay_contexts}
    if new_api:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    try:
        yield
    finally:
        if not was:
            (hf.activation_checkpointing_disable if new_api else hf.gradient_checkpointing_disable)()
        for m, flag in modes:
            m.training = flag


_POSITION_MARK = "_lxt_plus_position_table"


@contextlib.contextmanager
def leaf_at_embeddings(
    model: nn.Module, store: list[Tensor], extra: list[Tensor], rows: int, tokens: bool = True
) -> Iterator[None]:
    """Replace the token-embedding output by a leaf that requires grad (``store[0]``), and the
    outputs of other embeddings (positions, token types) by leaves too (``extra``), so the
    relevance that lands on them is reported. ``tokens=False``: an image input is the leaf itself,
    and only the added embeddings become leaves."""
    embs, added = embedding_leaves(model, tokens=tokens)
    paths = {id(m): path for path, m in model.named_modules()}
    seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    def token_hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        store.append(leaf)
        # a copy: model code may scale the embeddings in place (CTRL's ``embeds *= sqrt(d)``)
        return leaf.clone()

    def added_leaf(out: Tensor, position: bool) -> Tensor:
        value = out.detach()
        if rows > 1 and value.dim() >= 2:  # shared over the batch: one copy per row
            if value.shape[0] == 1:
                value = value.expand(rows, *value.shape[1:]).clone()
            elif store and value.dim() == store[0].dim() - 1 and value.shape[-1] == store[0].shape[-1]:
                # a table with no batch dimension, ``(seq, width)``, which the model broadcasts over
                # the rows when it adds it (BART-style learned and sinusoidal positions): as one
                # tensor its relevance would be the sum over the rows, owned by none of them
                value = value.expand(rows, *value.shape).clone()
        leaf = value.requires_grad_(True)
        if position:
            setattr(leaf, _POSITION_MARK, True)  # its relevance is the position's (PA-LRP)
        extra.append(leaf)
        return leaf

    def other_hook(module: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, Tensor) or not out.is_floating_point():
            return out
        path = paths.get(id(module), "")
        return added_leaf(out, is_position_embedding(module, path) and not (seq2seq and "decoder" in path))

    hooks = [e.register_forward_hook(token_hook) for e in embs]
    hooks += [m.register_forward_hook(other_hook) for m in added]
    try:
        # rows read from a position buffer in forward (CTRL's sinusoidal table) are leaves too
        with position_buffer_leaves(model, lambda out: added_leaf(out, True)):
            yield
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------ explain
def explain(
    model: nn.Module,
    inputs: Any,
    target: Any = None,
    *,
    tokenizer: Any = None,
    rules: str | Preset | dict[str, Any] = "attnlrp",
    contrast: Any = None,
    attention_mask: Tensor | None = None,
    position: int | None = None,
    capture: Sequence[str] | str | None = None,
    chat: bool = False,
    strict: bool = True,
    checkpointing: bool = False,
    strict_target: bool = False,
    pipeline_kwargs: dict[str, Any] | None = None,
    decoder_input_ids: Tensor | None = None,
    images: Any = None,
    processor: Any = None,
) -> Explanation:
    """Explain a prediction with LRP in one forward and one backward pass.

    Parameters
    ----------
    model:
        A HF causal LM, sequence or image classifier, or a plain ``torch.nn.Module``. Or a
        ``text-classification``, ``text-generation``, ``fill-mask`` or ``image-classification``
        pipeline: its answer (the label it prints, the token it generates, the token that fills the
        mask) is explained on the inputs it prepares itself, and the pipeline is left unchanged.
    inputs:
        Text or a list of texts (with ``tokenizer``), ``input_ids`` ``(seq,)``/``(batch, seq)``, a
        tokenizer output, ``pixel_values`` ``(batch, C, H, W)``, a processor's output (for a
        vision-language model: ``input_ids`` with image placeholders and ``pixel_values``; the
        result's ``image_relevance`` is then beside the token ``relevance``), or features
        ``(batch, n)``. With ``images=`` and ``processor=``: the text (``None`` for an image classifier).
    target:
        ``None`` for the prediction (next token at the last real position, or the predicted
        class); a token id or token string (several tokens: the sum of their logits); a class
        index or label name. A list gives one target per row. Or any scalar: a function from the
        model's output (for HF models the ``ModelOutput``, whose ``logits`` then cover every
        position) to one value per row, ``(batch,)`` — a log probability, a margin over a set of
        tokens, a sum over a span; ``target_logit`` and the conservation check then refer to it.
        A function of two arguments gets ``(output, positions)``, the explained position of each
        row of a causal LM (needed for padded batches and ``position=``, e.g.
        ``lambda out, pos: out.logits[torch.arange(len(pos)), pos, token_id]``).
    contrast:
        A foil: the explained value becomes ``logit(target) - logit(contrast)``.
    rules:
        Preset name (``"attnlrp"``, ``"cp-lrp"``, ``"ah-lrp"``, ``"gradient"``...; see :func:`~lxt_plus.engine.plan.list_presets`), YAML path or
        :class:`~lxt_plus.engine.plan.Preset`.
    position:
        For causal LMs, the position whose next-token logits are explained (default: last real
        token of each row).
    capture:
        Latent relevance to keep: any of ``"layers"``, ``"heads"``, ``"neurons"``.
    chat:
        Wrap each text in the tokenizer's chat template (user turn + generation prompt).
    checkpointing:
        Gradient (activation) checkpointing while explaining, for long contexts: layer activations
        are recomputed in the backward pass instead of stored. Dropout stays off; relevance is
        identical to the plain run.
    strict_target:
        A token target string that splits into several tokens, lacks the leading space of its
        one-token form, or looks like a class label raises :class:`~lxt_plus.errors.TargetError`
        instead of a :class:`~lxt_plus.errors.TargetWarning`.
    pipeline_kwargs:
        With a pipeline as ``model``: keyword arguments of the pipeline call
        (``{"max_new_tokens": 4}``, ``{"top_k": 3}``, ...).
    images, processor:
        Images (PIL images or arrays, as the processor takes them) and the model's processor, which
        prepares them with ``inputs`` as the text: ``explain(vlm, "Describe the image.",
        images=picture, processor=processor)``, or ``explain(vit, None, images=picture,
        processor=image_processor)``. The token strings come from ``processor.tokenizer``.
    decoder_input_ids:
        Encoder-decoder models (T5, BART, ...): the decoder prefix, ``(m,)`` or ``(batch, m)``;
        the target is the token after it (or at decoder ``position``). Default: the decoder's start
        token alone, i.e. the first generated token. ``relevance`` is then over the encoder's input
        tokens and ``decoder_relevance`` over the prefix; both count in ``conservation``.

    Returns
    -------
    Explanation
        ``relevance`` is ``(seq,)`` for one sequence or ``(batch, seq)`` for a batch.
        ``positional`` is each position's relevance where the model's position encoding takes
        some (added tables under every preset, rotary angles under ``pa-attnlrp``); under the
        positional presets ``relevance`` is token plus position and ``token_relevance`` the
        tokens alone (PA-LRP, Bakish et al. 2025).
    """
    if is_pipeline(model):
        if tokenizer is not None or attention_mask is not None or chat:
            raise InputError(
                "a pipeline tokenises its inputs itself: drop tokenizer=, attention_mask= and chat="
            )
        call = resolve_pipeline(model, inputs, target, pipeline_kwargs)
        return explain(
            call.model,
            call.inputs,
            call.target,
            tokenizer=call.tokenizer,
            rules=rules,
            contrast=contrast,
            position=call.position if position is None else position,
            capture=capture,
            strict=strict,
            checkpointing=checkpointing,
            strict_target=strict_target,
        )
    if pipeline_kwargs is not None:
        raise InputError("pipeline_kwargs= is for a pipeline passed as the model")
    require_module(model, "explain")
    if position is not None:
        position = _index(position, "position")
    if images is not None or processor is not None:
        inputs, tokenizer = _processed(model, inputs, images, processor, tokenizer)
    kind = model_kind(model)
    function = _target_function(target, contrast)
    batch = _prepare(model, inputs, tokenizer, attention_mask, kind, chat)
    captures = _parse_capture(capture)
    with (
        _memory_errors(batch),
        image_input_errors(model, "pixel_values" in batch.model_inputs),
        explaining(model, rules, strict=strict, keep_train=checkpointing) as handle,
        _checkpointing(model, checkpointing),
    ):
        _check_fits(model, handle, batch, checkpointing)
        if batch.values is not None and not is_hf_model(model):
            check_plain(handle, batch.values.to(input_device(model)))
        if "pixel_values" in batch.model_inputs and batch.input_ids is not None:  # a vision-language input
            check_images(
                handle,
                {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.model_inputs},
            )
        preset_name = handle.preset.name
        recorder = _make_recorder(model, captures)
        extra: list[Tensor] = []
        decoder: list[Tensor] = []  # an encoder-decoder's decoder-prefix leaf
        pixels: list[Tensor] = []  # a vision-language model's images
        with recorder, input_relevance() as exact, offloaded_saves(model), positional_leaves() as rotary:
            leaf, logits, positions, output = _forward(
                model, batch, kind, position, extra, function is not None, decoder_input_ids, decoder, pixels
            )
        rows = logits.shape[0]
        if function is not None:
            padded = batch.attention_mask is not None and bool((batch.attention_mask == 0).any())
            picked, targets, sel_ids, foil_ids = _function_target(
                function, output, rows, kind, positions, padded, position
            )
        else:
            targets, sel_ids, foil_ids = _targets(
                model, kind, logits, target, contrast, tokenizer, rows, positions, strict_target
            )
            picked = torch.stack([acc(logits[r, list(sel_ids[r])]).sum() for r in range(rows)])
        if any(foil_ids):
            picked = picked - torch.stack(
                [
                    acc(logits[r, list(foil_ids[r])]).sum() if foil_ids[r] else acc(logits.new_zeros(()))
                    for r in range(rows)
                ]
            )
        if not torch.isfinite(picked).all():
            raise NumericalError(
                f"the target logit is {picked.tolist()} in dtype {logits.dtype}; use float32 or bfloat16"
            )
        latent = recorder.tensors()
        angles = [t for call in rotary for t in call]
        wanted = [leaf, *decoder, *pixels, *extra, *latent, *angles]
        grads = torch.autograd.grad(picked.sum(), wanted, allow_unused=True)
        if angles:
            angle_grads, grads = grads[len(grads) - len(angles) :], grads[: len(grads) - len(angles)]
        decoder_rel = None
        if decoder:
            g = grads[1] if grads[1] is not None else torch.zeros_like(decoder[0])
            decoder_rel = (acc(decoder[0].detach()) * acc(g)).sum(-1).detach().cpu()
            grads = grads[:1] + grads[2:]
        images = None
        if pixels:
            images = _image_relevance(model, pixels[0], grads[1], rows)
            grads = grads[:1] + grads[2:]
        grad = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
        rel = acc(leaf.detach()) * acc(grad)
        for correction in exact.get(id(leaf), []):  # rules with constant input terms (z^B, flat)
            rel = rel + correction
        extra_grads = grads[1 : 1 + len(extra)]
        extra_rel = _extra_relevance(extra, extra_grads, rows)
        recorder.finish(grads[1 + len(extra) :], rows)
        seq = batch.input_ids.shape[1] if batch.input_ids is not None else 0
        # each position's relevance: added position tables' share, plus rotary angles' per layer
        table = _table_share(extra, extra_grads, rows, seq) if seq else None
        positional_layers = (
            positional_relevance(rotary, angle_grads if angles else (), rows, seq) if seq else None
        )
        positional = table
        if positional_layers is not None:
            angle_share = positional_layers.sum(1)
            positional = angle_share if table is None else table + angle_share
        if batch.input_ids is not None:
            rel = _token_layout(model, rel, tuple(batch.input_ids.shape))
        if batch.input_ids is not None and rel.shape[1] > batch.input_ids.shape[1]:
            # the model padded the input itself (Longformer, to its attention window): the padding's
            # relevance is reported with the positions', the tokens keep their own
            n = batch.input_ids.shape[1]
            pad = rel[:, n:].reshape(rows, -1).sum(-1).detach().cpu()
            extra_rel = pad if extra_rel is None else extra_rel + pad
            rel = rel[:, :n]
    if batch.values is not None:
        shown = leaf.detach()
        if "spatial_shapes" in batch.model_inputs:  # patch lists: back onto the image grid
            grid = (
                int(batch.model_inputs["spatial_shapes"][0][0]),
                int(batch.model_inputs["spatial_shapes"][0][1]),
            )
            size = patch_size(model) or 1
            pad = rel[:, grid[0] * grid[1] :].reshape(rows, -1).sum(-1).detach().cpu()  # padding patches
            extra_rel = pad if extra_rel is None else extra_rel + pad
            rel, shown = patch_list_images(rel, grid, size), patch_list_images(shown, grid, size)
        if is_hf_model(model) and rel.dim() == 4:
            images = ImageRelevance(rel.detach().cpu(), shown.cpu(), patch_size(model))
            rel = rel.sum(1)
        mask = None
    else:
        rel = rel.sum(-1)
        mask = batch.attention_mask
        extra_rel = _padding_share(rel, mask, picked, extra_rel, type(model).__name__)  # type: ignore[arg-type]
        rel = rel * mask.to(rel.dtype)  # type: ignore[union-attr]  # token batches always carry a mask
    pairs = handle.preset.positional and positional is not None
    if handle.preset.positional and positional is None and batch.input_ids is not None:
        warnings.warn(
            f"rules={preset_name!r}: no position encoding of {type(model).__name__} takes relevance (no "
            "added position table, and no real-valued rotary cos/sin handed to its attention modules "
            "as position_embeddings), so relevance is that of the preset without 'pa-'",
            LxtPlusWarning,
            stacklevel=2,
        )
    if positional is not None:
        positional = positional * mask.cpu().double()  # type: ignore[union-attr]
        if pairs:  # PA-LRP: each position's relevance joins its token's
            if table is not None and extra_rel is not None:
                extra_rel = extra_rel - table.sum(-1).to(extra_rel.dtype)
            rel = rel + positional.to(rel.device, rel.dtype)
    if not torch.isfinite(rel).all():
        raise NumericalError(
            f"relevance has NaN/inf (model dtype {leaf.dtype}); float16 overflows in relevance: "
            "use model.to(torch.bfloat16) or float32"
        )
    probs = None
    if kind != "plain" and function is None:
        probs = torch.stack(
            [torch.softmax(logits[r].detach().float(), -1)[sel_ids[r][0]] for r in range(rows)]
        )
    tokens = _token_strings(tokenizer, batch, rel)
    return Explanation(
        batch_relevance=rel.detach().cpu(),
        tokens=tokens,
        token_ids=None if batch.input_ids is None else batch.input_ids.cpu(),
        attention_mask=None if mask is None else mask.cpu(),
        targets=targets,
        target_logit=acc(picked.detach()).cpu(),
        probability=None if probs is None else probs.cpu(),
        rules=preset_name,
        single=batch.single,
        modality="tokens"
        if batch.input_ids is not None
        else ("pixels" if is_hf_model(model) else "features"),
        captures=recorder.result(),
        extra_relevance=extra_rel,
        decoder_relevance=decoder_rel,
        decoder_ids=None if getattr(output, "decoder_ids", None) is None else output.decoder_ids.cpu(),
        images=images,
        positional_relevance=None if positional is None else positional.float(),
        positional_layers=None if positional_layers is None else positional_layers.float(),
        pairs=pairs,
        hidden=None
        if batch.hidden is None
        else batch.hidden & mask.bool().cpu()
        if mask is not None
        else None,
    )


_GRID = "_lxt_plus_image_grid"  # a pixel leaf's image_grid_thw (pre-cut patches) or spatial_shapes


def image_grid(inputs: Any) -> Tensor | None:
    """How a vision-language input's pixels go back into images: Qwen2-VL's ``image_grid_thw``
    (pre-cut patches), or SigLIP2's ``spatial_shapes`` (patch lists, LFM2-VL); ``None`` for images."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        grid = inputs.get("spatial_shapes")
    return torch.as_tensor(grid) if grid is not None else None


def pixel_grid(leaf: Tensor) -> Tensor | None:
    """The :func:`image_grid` that came with a pixel leaf (see :func:`with_pixel_leaf`)."""
    return cast(Tensor | None, getattr(leaf, _GRID, None))


def _patch_list_grid(model: nn.Module, pixels: Tensor, shapes: Tensor) -> tuple[int, int]:
    """``(rows, columns)`` of the patch grid of SigLIP2's patch lists ``(images, patches, P·P·C)``
    with their ``spatial_shapes``, checked: one grid for every image, and one the lists hold."""
    if shapes.shape != (pixels.shape[0], 2):
        raise InputError(
            f"spatial_shapes must be (batch, 2) for {pixels.shape[0]} rows, got {tuple(shapes.shape)}"
        )
    if bool((shapes != shapes[0]).any()):
        raise InputError(
            f"{type(model).__name__}: images of different patch grids in one batch ({shapes.tolist()}); explain "
            "one image at a time, or resize them to one size"
        )
    size = patch_size(model)
    h, w = (int(v) for v in shapes[0])
    if size is None or h * w > pixels.shape[1] or pixels.shape[2] % (size * size):
        raise InputError(
            f"{type(model).__name__}: patch lists of shape {tuple(pixels.shape)} do not hold a {h} x {w} grid of "
            f"patches of {size} pixels; pass the model's image processor output unchanged"
        )
    return h, w


def _patch_layout(model: nn.Module) -> tuple[int, int, int]:
    """``(patch, temporal, merge)`` sizes of a vision tower that takes pre-cut patches (Qwen2-VL)."""
    layout = precut_patch_layout(model)
    if layout is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} takes pre-cut patches but its vision config does not give patch_size, "
            "temporal_patch_size and spatial_merge_size; lxt_plus cannot map the relevance onto the image"
        )
    return layout


def _unmapped(model: nn.Module, pixels: Tensor) -> UnsupportedModelError:
    """The error for ``pixel_values`` in a layout :func:`as_images` cannot read."""
    return UnsupportedModelError(
        f"{type(model).__name__} takes pixel_values of shape {tuple(pixels.shape)} (neither images laid out as "
        "(images, C, H, W) or (rows, images, C, H, W), nor pre-cut patches with image_grid_thw, nor patch "
        "lists with spatial_shapes); "
        "lxt_plus cannot map that relevance back onto the image"
    )


def _check_grid(model: nn.Module, pixels: Tensor, grid: Tensor) -> tuple[int, int]:
    """``(height, width)`` in patches of the images a ``(patches, C·T·P·P)`` input holds, all of one size."""
    if grid.dim() != 2 or grid.shape[1] != 3 or int(grid.prod(-1).sum()) != pixels.shape[0]:
        raise InputError(
            f"image_grid_thw of shape {tuple(grid.shape)} does not describe the {pixels.shape[0]} patches of "
            "pixel_values; pass the processor's output unchanged"
        )
    if (grid[:, 0] != 1).any():
        raise UnsupportedModelError(
            f"{type(model).__name__}: an image grid with more than one frame (video) cannot be shown as an "
            "image; lxt_plus explains still images only"
        )
    if (grid[:, 1:] != grid[:1, 1:]).any():
        raise UnsupportedModelError(
            f"{type(model).__name__}: images of different sizes in one input ({grid[:, 1:].tolist()} patches); "
            "explain one image at a time, or resize them to one size"
        )
    return int(grid[0, 1]), int(grid[0, 2])


def as_images(model: nn.Module, t: Tensor, grid: Tensor | None, copies: str = "sum") -> Tensor:
    """``t``, laid out as the model's ``pixel_values``, as images ``(images, C, H, W)``:

    - ``(images, C, H, W)`` as it is;
    - ``(rows, images, C, H, W)`` (Idefics3, SmolVLM) with the rows' images one after another;
    - Qwen2-VL's pre-cut patches ``(patches, C·T·P·P)`` with their ``image_grid_thw`` put back in
      place (the processor orders patches by merge window, and repeats each image ``T`` times
      along the patch): ``copies="sum"`` adds up the ``T`` copies (relevance), ``"mean"`` averages
      them (the pixels);
    - SigLIP2's patch lists ``(images, patches, P·P·C)`` with their ``spatial_shapes`` (LFM2-VL),
      padding dropped.
    """
    if t.dim() == 4:
        return t
    if t.dim() == 5:
        return t.flatten(0, 1)
    if t.dim() == 3 and grid is not None and grid.dim() == 2 and grid.shape[-1] == 2:
        shape = _patch_list_grid(model, t, grid)
        return patch_list_images(t, shape, cast(int, patch_size(model)))
    if t.dim() != 2 or grid is None:
        raise _unmapped(model, t)
    patch, frames, merge = _patch_layout(model)
    gh, gw = _check_grid(model, t, grid)
    n = grid.shape[0]
    channels = t.shape[1] // (frames * patch * patch)
    x = t.reshape(n, gh // merge, gw // merge, merge, merge, channels, frames, patch, patch)
    x = x.sum(6) if copies == "sum" else x.mean(6)
    # (n, H/m, W/m, m, m, C, P, P) -> (n, C, H/m, m, P, W/m, m, P)
    return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(n, channels, gh * patch, gw * patch)


def image_owners(model: nn.Module, pixels: Tensor, rows: int, grid: Tensor | None = None) -> Tensor:
    """The batch row of each image of a vision-language input, ``(images,)``: one image per row,
    or all images to a single row. Inputs that cannot be laid out as images (:func:`as_images`)
    are refused by name, as are images that cannot be given to rows."""
    if not pixels.is_floating_point():
        raise InputError(f"pixel_values must be a floating-point tensor, got {pixels.dtype}")
    if pixels.dim() == 5 and pixels.shape[0] == rows:  # (rows, images, C, H, W): Idefics3, SmolVLM
        return torch.arange(rows).repeat_interleave(pixels.shape[1])
    if pixels.dim() == 3 and grid is not None and grid.dim() == 2 and grid.shape[-1] == 2:
        _patch_list_grid(model, pixels, grid)  # patch lists (LFM2-VL)
        n = pixels.shape[0]
    elif pixels.dim() == 2 and grid is not None:
        _patch_layout(model)
        _check_grid(model, pixels, grid)
        n = grid.shape[0]
    elif pixels.dim() in (4, 5):  # images, or rows' images that do not match the rows
        n = pixels.shape[0] if pixels.dim() == 4 else pixels.shape[0] * pixels.shape[1]
    else:
        raise _unmapped(model, pixels)
    if n == rows:
        return torch.arange(n)
    if rows == 1:
        return torch.zeros(n, dtype=torch.long)
    raise InputError(
        f"{n} images for {rows} rows: lxt_plus cannot tell which image belongs to which row; "
        "explain one row at a time, or give one image per row"
    )


def with_pixel_leaf(inputs: dict[str, Any], device: torch.device) -> tuple[dict[str, Any], Tensor | None]:
    """Model inputs on ``device``, with ``pixel_values`` (if there) replaced by a leaf that requires
    grad; returns the inputs and that leaf."""
    moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    leaf = moved.get("pixel_values")
    if isinstance(leaf, Tensor):
        leaf = moved["pixel_values"] = leaf.detach().requires_grad_(True)
        setattr(leaf, _GRID, image_grid(moved))  # how pre-cut patches or patch lists go back into images
    return moved, leaf


def _image_relevance(model: nn.Module, pixels: Tensor, grad: Tensor | None, rows: int) -> ImageRelevance:
    """The pixel leaf's relevance, per channel, with the row each image belongs to."""
    g = grad if grad is not None else torch.zeros_like(pixels)
    grid = pixel_grid(pixels)
    owners = image_owners(model, pixels, rows, grid)
    channels = as_images(model, (acc(pixels.detach()) * acc(g)).detach(), grid).cpu()
    shown = as_images(model, pixels.detach(), grid, copies="mean").cpu()
    return ImageRelevance(channels, shown, patch_size(model), owners)


def position_tables(extra: list[Tensor]) -> list[Tensor]:
    """The leaves among ``extra`` that are added position tables (learned, sinusoidal)."""
    return [leaf for leaf in extra if getattr(leaf, _POSITION_MARK, False)]


def _table_share(leaves: list[Tensor], grads: Sequence[Tensor | None], rows: int, seq: int) -> Tensor | None:
    """Per-position relevance ``(rows, seq)`` of the added position tables (learned, sinusoidal)."""
    total = None
    for leaf, g in zip(leaves, grads, strict=True):
        if g is None or not getattr(leaf, _POSITION_MARK, False):
            continue
        r = (acc(leaf.detach()) * acc(g)).sum(-1)
        if r.dim() == 1:
            r = r[None]
        if r.dim() != 2 or r.shape[-1] != seq or r.shape[0] not in (rows, 1):
            continue  # a table not laid out along the tokens (it still counts in extra_relevance)
        r = r.detach().double().cpu().expand(rows, seq)
        total = r if total is None else total + r
    return total


def _padding_share(
    rel: Tensor, mask: Tensor, logit: Tensor, extra: Tensor | None, name: str
) -> Tensor | None:
    """Add the relevance on padding tokens to ``extra`` (reported with the positions'), warning when
    it is more than float error: a model that does not mask its padding (FNet mixes every position,
    ConvBERT's convolution reaches across the pad) is influenced by it, and the token heatmap, which
    shows no padding, would otherwise silently miss that share of the logit."""
    pad = mask.to(rel.device) == 0
    if not bool(pad.any()):
        return extra
    share = (acc(rel.detach()) * pad).sum(-1).cpu()
    if not bool(share.any()):  # a model that masks its padding: nothing lands there
        return extra
    scale = acc(logit.detach()).abs().cpu().clamp_min(1e-12)
    worst = float((share.abs() / scale).max())
    if worst > 1e-5:
        warnings.warn(
            f"{name} lets the padding tokens influence the prediction (up to {100 * worst:.2g}% of the "
            "explained logit lands on them): its output for a padded row differs from the unpadded "
            "text's. That share is in conservation's position_relevance; explain rows one at a time "
            "(no padding) for the text's own explanation",
            LxtPlusWarning,
            stacklevel=3,
        )
    return share if extra is None else extra + share.to(extra.dtype)


def _extra_relevance(leaves: list[Tensor], grads: Sequence[Tensor | None], rows: int) -> Tensor | None:
    """Per-row relevance absorbed by position / token-type embeddings, or ``None`` if there are none."""
    total = None
    for leaf, g in zip(leaves, grads, strict=True):
        if g is None or (leaf.shape[0] != rows and rows != 1):
            continue  # a table without a batch dimension is shared: only one row can own it
        r = (acc(leaf.detach()) * acc(g)).reshape(rows, -1).sum(-1)
        total = r if total is None else total + r
    return None if total is None else total.cpu()


def _needs_positions(model: nn.Module, mask: Tensor) -> bool:
    """Whether to hand a padded batch the positions its rows would have unpadded (as ``generate``
    does for left padding). A model that numbers positions from its input ids itself (RoBERTa's
    ``padding_idx + 1`` offset) does so already, and must not be given zero-based ones."""
    if not accepts(model, "position_ids") or not bool((mask == 0).any()):
        return False
    return not any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules())


def _forward(
    model: nn.Module,
    batch: _Batch,
    kind: str,
    position: int | None,
    extra: list[Tensor],
    all_logits: bool = False,
    decoder_input_ids: Tensor | None = None,
    decoder: list[Tensor] | None = None,
    images: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor, list[int], Any]:
    """Run the patched model; return the leaf, per-row logits ``(batch, n_out)``, positions and the
    model's own output. ``all_logits`` keeps every position's logits (for a target function).
    An encoder-decoder's decoder-prefix leaf goes to ``decoder``, a vision-language model's pixel
    leaf to ``images``."""
    device = input_device(model)
    if batch.values is not None:
        leaf = batch.values.detach().to(device).requires_grad_(True)
        if is_hf_model(model):
            more = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.model_inputs.items()}
            with leaf_at_embeddings(model, store=[], extra=extra, rows=leaf.shape[0], tokens=False):
                out = model(**{getattr(model, "main_input_name", "pixel_values"): leaf}, **more)
            return leaf, _image_logits(model, out), [], out
        out = model(leaf)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise InputError(
                f"{type(model).__name__} must return a (batch, n_outputs) tensor to be explained, "
                f"got {type(out).__name__}"
            )
        return leaf, out, [], out
    ids = batch.input_ids.to(device)  # type: ignore[union-attr]
    mask = batch.attention_mask.to(device)  # type: ignore[union-attr]
    store: list[Tensor] = []
    rows = ids.shape[0]
    extras, pixels = with_pixel_leaf(batch.model_inputs, device)
    if pixels is not None and images is not None:
        images.append(pixels)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **extras}
    if accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    positions: list[int] = []
    if kind == "causal-lm" and is_seq2seq(model):
        return _forward_seq2seq(model, kwargs, rows, position, extra, decoder_input_ids, decoder)
    if decoder_input_ids is not None:
        raise InputError(
            f"decoder_input_ids= is for encoder-decoder models; {type(model).__name__} is not one"
        )
    if kind == "causal-lm":
        last = (mask.shape[1] - 1 - mask.flip(-1).argmax(-1)).tolist()  # last real token per row
        if position is not None:
            n = mask.shape[1]
            if not -n <= position < n:
                raise TargetError(f"position {position} is out of range for a sequence of {n} tokens")
            positions = [position % n] * len(last)
            for r, p in enumerate(positions):
                if not bool(mask[r, p]):
                    raise TargetError(f"position {p} is a padding position in row {r}")
        else:
            positions = last
        if _needs_positions(model, mask):
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        keep = sorted(set(positions))
        if accepts(model, "logits_to_keep") and not all_logits:
            kwargs["logits_to_keep"] = torch.tensor(keep, device=device)
        with leaf_at_embeddings(model, store, extra, rows):
            out = model(**kwargs)
        logits = out.logits
        if logits.shape[1] == len(keep) and "logits_to_keep" in kwargs:
            index = {p: i for i, p in enumerate(keep)}
            rows = [logits[r, index[p]] for r, p in enumerate(positions)]
        else:
            rows = [logits[r, p] for r, p in enumerate(positions)]
        if not store:
            raise UnsupportedModelError(
                f"{type(model).__name__} did not call its input embeddings, so there is no token relevance to "
                "read; explain a model whose forward embeds input_ids with get_input_embeddings()"
            )
        return store[0], torch.stack(rows), positions, out
    with leaf_at_embeddings(model, store, extra, rows):
        out = model(**kwargs)
    if not store:
        raise UnsupportedModelError(
            f"{type(model).__name__} did not call its input embeddings, so there is no token relevance to "
            "read; explain a model whose forward embeds input_ids with get_input_embeddings()"
        )
    if (
        len(store) > 1
        and getattr(cast(Any, model).config, "is_encoder_decoder", False)
        and decoder is not None
    ):
        decoder.append(store[-1])  # a classifier's decoder reads the shifted input (BART, T5)
        extra.extend(store[1:-1])
    return store[0], out.logits, positions, out


def _image_logits(model: nn.Module, out: Any) -> Tensor:
    """The class scores of an image model: ``logits``, or a ``(batch, classes)`` ``last_hidden_state``
    (PP-LCNet's classifier returns its scores there)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        hidden = getattr(out, "last_hidden_state", None)
        if isinstance(hidden, Tensor) and hidden.dim() == 2:
            logits = hidden
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise UnsupportedModelError(
            f"{type(model).__name__} returns {type(out).__name__} without (batch, classes) logits, so "
            "there is no class score to explain; explain its ...ForImageClassification model instead"
        )
    return logits


def _token_layout(model: nn.Module, rel: Tensor, ids: tuple[int, ...]) -> Tensor:
    """Token relevance laid out as the ids, ``(batch, seq, ...)``: XLNet embeds the transposed ids
    ``(seq, batch)``. Any other layout is refused rather than broadcast into a wrong heatmap."""
    if rel.dim() < 2 or tuple(rel.shape[:2]) == ids:
        return rel
    if tuple(rel.shape[:2]) == ids[::-1]:
        return rel.transpose(0, 1)
    if rel.shape[0] == ids[0] and rel.shape[1] > ids[1]:
        return rel  # the model padded the sequence itself; handled by the caller
    raise UnsupportedModelError(
        f"{type(model).__name__}'s token embeddings have shape {tuple(rel.shape)}, which does not match its "
        f"input ids {ids}: lxt_plus cannot tell which relevance belongs to which token"
    )


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder LM (T5, BART, ...): its target is a decoder position."""
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "is_encoder_decoder", False)) and "Classification" not in type(model).__name__


def _forward_seq2seq(
    model: nn.Module,
    kwargs: dict[str, Any],
    rows: int,
    position: int | None,
    extra: list[Tensor],
    decoder_input_ids: Tensor | None,
    decoder: list[Tensor] | None,
) -> tuple[Tensor, Tensor, list[int], Any]:
    """Encoder tokens and the decoder prefix are both leaves; the target is the logit at the last
    decoder position (or ``position`` in the decoder): the token the model generates next."""
    device = kwargs["input_ids"].device
    if decoder_input_ids is None:
        dec = torch.full((rows, 1), decoder_start(model), dtype=torch.long, device=device)
    else:
        dec = torch.as_tensor(decoder_input_ids).to(device)
        dec = dec[None] if dec.dim() == 1 else dec
        if dec.dim() != 2 or dec.shape[0] != rows or dec.shape[1] == 0 or dec.is_floating_point():
            raise InputError(
                f"decoder_input_ids must be integer ids of shape (decoder_len,) or ({rows}, decoder_len), "
                f"got shape {tuple(dec.shape)} and dtype {dec.dtype}"
            )
        check_ids(model, dec)
    m = dec.shape[1]
    if position is not None and not -m <= position < m:
        raise TargetError(f"position {position} is out of range for a decoder prefix of {m} tokens")
    at = (position if position is not None else -1) % m
    kwargs = {**kwargs, "decoder_input_ids": dec}
    store: list[Tensor] = []
    with leaf_at_embeddings(model, store, extra, rows):
        out = model(**kwargs)
    if len(store) < 2:
        raise UnsupportedModelError(
            f"{type(model).__name__} did not call the encoder's and the decoder's input embeddings, so there "
            "is no token relevance to read"
        )
    if decoder is not None:
        decoder.append(store[-1])
    extra.extend(store[1:-1])  # embeddings of padding the model adds itself (LED pads to its window)
    out.decoder_ids = dec
    return store[0], out.logits[:, at], [at] * rows, out


def _target_function(target: Any, contrast: Any) -> Callable[[Any], Tensor] | None:
    """``target`` when it is a function of the model output, else ``None``."""
    if not callable(target) or isinstance(target, (str, int, Tensor)):
        return None
    if contrast is not None:
        raise TargetError(
            "a target function cannot take a contrast: compute the margin inside the function, "
            "e.g. target=lambda out: out.logits[:, -1, a] - out.logits[:, -1, b]"
        )
    return cast(Callable[[Any], Tensor], target)


def _function_target(
    function: Callable[..., Tensor],
    output: Any,
    rows: int,
    kind: str,
    positions: list[int],
    padded: bool,
    position: int | None,
) -> tuple[Tensor, list[Target], list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The explained values ``(rows,)`` from a target function, with their result records.

    A function of two arguments gets ``(output, positions)``: for a causal LM the explained position
    of each row (its last real token, or ``position=``) as a ``(rows,)`` tensor, else ``None``. A
    one-argument function on a padded causal-LM batch, or with ``position=``, would read the wrong
    positions for some rows (``logits[:, -1]`` is a pad on the right, spans shift on the left), so it
    is refused with the two-argument form as the fix.
    """
    name = getattr(function, "__name__", type(function).__name__)
    try:
        arity = sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            for p in inspect.signature(function).parameters.values()
        )
    except (TypeError, ValueError):
        arity = 1
    causal = kind == "causal-lm"
    if arity < 2 and causal and (padded or position is not None):
        why = "with position=" if position is not None else "on a padded batch (rows of different lengths)"
        raise TargetError(
            f"the target function {name!r} takes only the model output, which {why} does not say which "
            "position each row explains; give it a second argument for the positions, e.g. "
            "target=lambda out, pos: out.logits[torch.arange(len(pos)), pos, token_id]"
        )
    explained = torch.tensor(positions, device=_logits_of(output).device) if causal else None
    try:
        value = function(output, explained) if arity >= 2 else function(output)
    except Exception as exc:  # the user's function: name it, keep its own message
        raise TargetError(f"the target function {name!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, Tensor) or value.numel() != rows or not value.is_floating_point():
        got = (
            f"a {tuple(value.shape)} {value.dtype} tensor"
            if isinstance(value, Tensor)
            else type(value).__name__
        )
        raise TargetError(
            f"the target function {name!r} must return one float per row, a ({rows},) tensor; got {got}"
        )
    if not value.requires_grad:
        raise TargetError(
            f"the target function {name!r} returned a value that does not depend on the model "
            "output (no gradient): compute it from the output it is given"
        )
    targets = [Target("function", (), name, positions[r] if causal else None) for r in range(rows)]
    return acc(value.reshape(rows)), targets, [()] * rows, [()] * rows


def _logits_of(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits


def _index(value: Any, name: str) -> int:
    """``value`` as a Python int (numpy and 0-d tensor integers too), or a TargetError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TargetError(f"{name} must be a token index (an int), got {value!r}") from None


def _targets(
    model: nn.Module,
    kind: str,
    logits: Tensor,
    target: Any,
    contrast: Any,
    tokenizer: Any,
    rows: int,
    positions: list[int],
    strict_target: bool = False,
) -> tuple[list[Target], list[tuple[int, ...]], list[tuple[int, ...]]]:
    n_out = logits.shape[-1]
    t_specs = _per_row(target, rows, "target")
    c_specs = _per_row(contrast, rows, "contrast")
    targets, sel, foil = [], [], []
    for r in range(rows):
        spec, cspec = t_specs[r], c_specs[r]
        if kind == "causal-lm":
            vocab = n_out
            if spec is None:
                spec = int(logits[r].argmax())
            ids, label = resolve_token(tokenizer, spec, vocab, strict_target=strict_target)
            cids, clabel = (
                resolve_token(tokenizer, cspec, vocab, "contrast", strict_target=strict_target)
                if cspec is not None
                else ((), None)
            )
            targets.append(Target("token", ids, label, positions[r], cids, clabel))
        elif kind == "classifier":
            if spec is None:
                spec = int(logits[r].argmax())
            ids, label = _resolve_class(model, spec, n_out, "target")
            cids, clabel = (
                _resolve_class(model, cspec, n_out, "contrast") if cspec is not None else ((), None)
            )
            targets.append(Target("class", ids, label, None, cids, clabel))
        else:
            if spec is None:
                spec = int(logits[r].argmax())
            if isinstance(spec, bool) or not isinstance(spec, int) or not -n_out <= spec < n_out:
                raise TargetError(f"target must be an output index in 0..{n_out - 1}, got {spec!r}")
            cids = ()
            if cspec is not None:
                if isinstance(cspec, bool) or not isinstance(cspec, int) or not -n_out <= cspec < n_out:
                    raise TargetError(f"contrast must be an output index in 0..{n_out - 1}, got {cspec!r}")
                cids = (cspec % n_out,)
            ids = (spec % n_out,)
            targets.append(Target("output", ids, str(ids[0]), None, cids, None if not cids else str(cids[0])))
        if cids and set(cids) == set(ids):
            raise TargetError(
                f"the contrast is the target itself ({targets[-1].label!r}): logit(target) - logit(contrast) "
                "is zero and there is nothing to explain; pass another token or class as contrast="
            )
        sel.append(ids)
        foil.append(cids)
    return targets, sel, foil


def _token_strings(tokenizer: Any, batch: _Batch, rel: Tensor) -> list[list[str]]:
    if batch.input_ids is None:
        width = rel.shape[-1] if rel.dim() == 2 else 0
        return [[f"x{i}" for i in range(width)] for _ in range(rel.shape[0])]
    out = []
    for r, row in enumerate(batch.input_ids.tolist()):
        mask = batch.attention_mask[r].tolist() if batch.attention_mask is not None else [1] * len(row)
        if tokenizer is not None:
            toks = tokenizer.batch_decode([[i] for i in row])
        else:
            toks = [str(i) for i in row]
        out.append([t if m else "" for t, m in zip(toks, mask, strict=True)])
    return out


# ------------------------------------------------------------------------------------ capture hooks
def _parse_capture(capture: Sequence[str] | str | None) -> tuple[str, ...]:
    if capture is None:
        return ()
    items = (capture,) if isinstance(capture, str) else tuple(capture)
    valid = ("layers", "heads", "neurons")
    for c in items:
        if c not in valid:
            raise InputError(f"unknown capture {c!r}; valid: {', '.join(valid)}")
    return items


class _NoRecorder:
    def __enter__(self) -> _NoRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def tensors(self) -> list[Tensor]:
        return []

    def finish(self, grads: Sequence[Tensor | None], rows: int | None = None) -> None:
        return None

    def result(self) -> dict[str, Any]:
        return {}


def _make_recorder(model: nn.Module, captures: tuple[str, ...]) -> Any:
    if not captures:
        return _NoRecorder()
    from lxt_plus.api.capture import Recorder

    return Recorder(model, captures)
