"""Apply a plan to one model instance, reversibly.

- Module rules replace ``forward`` on the *instance*; ``remove()`` restores exactly what was there
  (``del module.forward`` so the class method shows again, or the previous instance attribute).
- Attention of models that dispatch through transformers' registry goes through our own keys
  (``lxt_plus_eager``, ``lxt_plus_sdpa``), registered once with the matching mask function. Each
  key calls the original implementation; modules that are not patched (another model sharing
  the config) fall back to it unchanged. Config values are restored on remove.
- No class, no ``torch.nn`` type and no transformers global is modified: our two registry keys
  exist only while a patched model uses them, and the last ``remove()`` takes them out again.
"""

from __future__ import annotations

import contextvars
import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import nn

from lxt_plus.engine.attention import AttentionSpec, own_backward, probs_match, qkv_rule, rule_attention
from lxt_plus.engine.detect import (
    accepts,
    decoder_start,
    embedding_leaves,
    end_of_sequence,
    image_shape,
    input_device,
    input_embeddings,
    is_hf_model,
    model_dtype,
    patch_size,
    precut_patch_layout,
    require_module,
)
from lxt_plus.engine.hf import ATTENTION_KEYS, original_attention, register_keys, switch_configs
from lxt_plus.engine.install import ATTENTION_RULES, Site
from lxt_plus.engine.modes import ElementwiseIdentityMode, SDPARuleMode
from lxt_plus.engine.offload import offloaded_weights
from lxt_plus.engine.opcheck import OpReport, check_operations
from lxt_plus.engine.plan import Plan, PlanEntry, Preset, build_plan, get_preset
from lxt_plus.engine.positional import position_buffer_leaves
from lxt_plus.engine.rules import AttentionRule, gate_products
from lxt_plus.errors import (
    AlreadyPatchedError,
    LxtPlusWarning,
    NotPatchedError,
    UnsupportedModelError,
)

__all__ = [
    "Handle",
    "patch",
    "patched",
    "is_patched",
    "handle_of",
    "ATTENTION_KEYS",
    "is_dual_encoder",
    "dual_embeddings",
]


_LOCK = threading.RLock()
_PATCHED: weakref.WeakKeyDictionary[nn.Module, Handle] = weakref.WeakKeyDictionary()
# model -> {(preset, strict): (structure signature, plan, paths routed to inline ops)}: validate
# once, reuse
_PLAN_CACHE: weakref.WeakKeyDictionary[
    nn.Module, dict[tuple[Preset, bool], tuple[Any, Plan, frozenset[str]]]
] = weakref.WeakKeyDictionary()


# Observers of patched attention calls in this thread (per-head capture): fn(module, q, k, v, mask, out)
ATTENTION_OBSERVERS: contextvars.ContextVar[tuple[Callable[..., None], ...]] = contextvars.ContextVar(
    "lxt_plus_attention_observers", default=()
)


# ----------------------------------------------------------------------------- attention registry
def _make_attention(original: str) -> Callable[..., Any]:
    def lxt_plus_attention(module, query, key, value, attention_mask, *args, **kwargs):  # type: ignore[no-untyped-def]
        fn = original_attention(module, original)
        found = ATTENTION_RULES.get(module)
        if found is None:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        rule, stats = found
        stats["attention_hits"] = stats.get("attention_hits", 0) + 1
        if "dropout" in kwargs:
            kwargs["dropout"] = 0.0
        out = None
        if not kwargs.get("softcap"):
            if original == "sdpa" and (rule.detach_weights or own_backward(query)):
                with SDPARuleMode(rule.detach_weights):  # our backward, see attention.rule_sdpa
                    out = fn(module, query, key, value, attention_mask, *args, **kwargs)
            elif original != "sdpa" and not args:
                out = _eager_with_rule(fn, module, query, key, value, attention_mask, kwargs, rule)
        # otherwise (AttnLRP through SDPA without checkpointing keeps torch's fused backward, as
        # attention.rule_sdpa does for inline calls): autograd through the attention function,
        # the rule's factors at q, k, v
        if out is None:
            q, k, v = qkv_rule(query, key, value, rule.detach_weights)
            if kwargs.get("softcap") and not rule.detach_weights:
                with ElementwiseIdentityMode(("tanh",)):  # identity rule on score soft-capping
                    out = fn(module, q, k, v, attention_mask, *args, **kwargs)
            else:
                out = fn(module, q, k, v, attention_mask, *args, **kwargs)
        for observe in ATTENTION_OBSERVERS.get():
            observe(module, query, key, value, attention_mask, out, kwargs)
        return out

    lxt_plus_attention.__qualname__ = f"lxt_plus_attention[{original}]"
    return lxt_plus_attention


def _eager_with_rule(
    fn: Callable[..., Any],
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Any,
    kwargs: dict[str, Any],
    rule: AttentionRule,
) -> Any:
    """The family's eager attention without gradient, then the rule's own backward pass.

    The eager function returns the attention weights, so the backward pass needs no recomputed
    scores. Returns ``None`` (use autograd instead) unless the weights provably are
    ``softmax(scaling · q kᵀ + mask)``, checked on the last query row.
    """
    with torch.no_grad():
        out = fn(module, query, key, value, mask, **kwargs)
    if not (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[0], torch.Tensor)
        and isinstance(out[1], torch.Tensor)
    ):
        return None
    attn, probs = out
    b, hq, n_q, _ = query.shape
    scale = kwargs.get("scaling")
    scale = float(scale) if scale is not None else query.shape[-1] ** -0.5
    if (
        attn.shape[:3] != (b, n_q, hq)
        or (mask is not None and not isinstance(mask, torch.Tensor))
        or (isinstance(mask, torch.Tensor) and mask.requires_grad)
        or not probs_match(query, key, probs, mask, scale)
    ):
        return None
    spec = AttentionSpec.for_rule(rule.detach_weights, scale=scale, mask=mask, causal=False)
    return rule_attention(query, key, value, attn, spec, probs=probs, heads_last=True), probs


# ----------------------------------------------------------------------------- handles
class Handle:
    """What :func:`patch` did to one model; ``remove()`` undoes all of it.

    Patching lasts on that instance until removed. Use it as a context manager to remove on exit,
    also when the body raises.
    """

    def __init__(self, model: nn.Module, plan: Plan, nested: bool = False, strict: bool = True) -> None:
        self.model = model
        self.plan = plan
        self.nested = nested
        self.strict = strict
        self._undo: list[Callable[[], None]] = []
        self._active = True

    @property
    def preset(self) -> Preset:
        return self.plan.preset

    @property
    def active(self) -> bool:
        return self._active

    def describe(self, show_pass: bool = False) -> str:
        """``module path -> rule`` for every module the plan touched."""
        return self.plan.describe(show_pass=show_pass)

    def remove(self) -> None:
        """Restore the model exactly. A nested handle (same plan applied twice) leaves the outer one."""
        if not self._active:
            raise NotPatchedError("this handle was already removed")
        self._active = False
        if self.nested:
            return
        with _LOCK:
            errors = []
            while self._undo:
                step = self._undo.pop()
                try:
                    step()
                except Exception as exc:  # keep undoing the rest, report afterwards
                    errors.append(exc)
            if _PATCHED.get(self.model) is self:
                del _PATCHED[self.model]
            if errors:
                raise ExceptionGroup(
                    f"{len(errors)} undo step(s) failed while removing the patch of "
                    f"{type(self.model).__name__}; every other step was undone",
                    errors,
                )

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"<lxt_plus.Handle {type(self.model).__name__} preset={self.preset.name!r} {state}>"


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is patched now."""
    return model in _PATCHED


def handle_of(model: nn.Module) -> Handle | None:
    """The handle of the patch on ``model`` now, or ``None``."""
    return _PATCHED.get(model)


# parameters added to activations: biases, and the learned tokens / positions that ViT-like
# embeddings add as plain parameters (an nn.Embedding's relevance is reported instead)
_ADDITIVE = (
    "bias",
    "b",
    "cls_token",
    "class_embedding",  # CLIP's learned class token
    "latents",  # Perceiver's learned latent array, its queries
    "position_embeddings",
    "distillation_token",
    "register_tokens",
    "image_newline",  # LLaVA-Next's learned token after each row of image features
    "view_separator",  # the learned token between an image's views (DeepSeek-VL's)
    "running_mean",  # subtracted by a batch norm in eval mode: a bias in all but sign
)


def _is_additive(name: str, t: torch.Tensor | None) -> bool:
    last = name.rsplit(".", 1)[-1]
    if t is None or not t.is_floating_point() or "mask" in last:  # GPT-J's masked_bias is a mask value
        return False
    return last in _ADDITIVE or last.endswith("_bias")


def _dense_gradient(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def _dense_batch_norm_grads(model: nn.Module, undo: list[Callable[[], None]]) -> None:
    """Give every batch norm a contiguous output gradient. torch's CPU batch-norm backward (2.13,
    eval and training mode) returns a wrong input gradient for a gradient laid out as a transposed
    view with batch size 1 (strides ``(C, 1, W*C, C)``, as LeViT's ``flatten(2).transpose(1, 2)``
    gives); plain gradients are wrong then too. ``tests/unit/test_vision_rules.py`` pins the bug."""

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(_dense_gradient)
        return out

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]

    def remove() -> None:
        for h in handles:
            h.remove()

    undo.append(remove)


def _zero_biases(model: nn.Module, undo: list[Callable[[], None]]) -> None:
    if any(p.device.type == "meta" for p in model.parameters()):
        raise UnsupportedModelError(
            f"{type(model).__name__} has offloaded weights (on the 'meta' device): zeroing biases for the "
            "conservation check needs the model in one piece; load it without offloading for the check"
        )
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_additive(name, p):
                saved.append((p, p.detach().clone()))
                p.zero_()
        for name, b in model.named_buffers():  # BART's final_logits_bias is a buffer
            if _is_additive(name, b):
                saved.append((b, b.detach().clone()))
                b.zero_()

    def restore() -> None:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)

    undo.append(restore)


def _takes_images(model: nn.Module) -> bool:
    """A model whose main input is not named ``pixel_values`` but is an image (Perceiver's)."""
    cfg = getattr(model, "config", None)
    return "Image" in type(model).__name__ or hasattr(
        getattr(cfg, "vision_config", None) or cfg, "image_size"
    )


def is_dual_encoder(model: nn.Module) -> bool:
    """An image-text dual encoder (CLIP, SigLIP): text and image towers whose embeddings are
    compared; it has no image placeholder tokens."""
    cfg = getattr(model, "config", None)
    return (
        all(callable(getattr(model, n, None)) for n in ("get_image_features", "get_text_features"))
        and getattr(cfg, "vision_config", None) is not None
        and getattr(cfg, "text_config", None) is not None
        and getattr(cfg, "image_token_id", getattr(cfg, "image_token_index", None)) is None
    )


def dual_embeddings(model: nn.Module, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image embeddings, text embeddings)`` of a dual encoder, each ``(n, d)``, from its towers."""
    hf = cast(Any, model)
    text_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    image = hf.get_image_features(pixel_values=inputs["pixel_values"])
    text = hf.get_text_features(**text_inputs)
    return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)


def _image_layouts(model: nn.Module, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """One small image in each layout that vision-language models take, the plain one first:
    ``(images, C, H, W)``; with ``image_sizes`` (Pixtral, Mistral3); ``(rows, images, C, H, W)``
    (Idefics3, SmolVLM), with ``image_sizes`` too (LLaVA-Next's tiles); Qwen2-VL's pre-cut patches
    ``(patches, C·T·P·P)`` with ``image_grid_thw``; SigLIP2's padded patch lists with
    ``spatial_shapes`` (LFM2-VL)."""
    c, h, w = image_shape(model)
    dtype = model_dtype(model)
    pixels = torch.randn(1, c, h, w, device=device, dtype=dtype)
    sizes = torch.tensor([[h, w]], device=device)
    yield {"pixel_values": pixels}
    yield {"pixel_values": pixels, "image_sizes": sizes}
    yield {"pixel_values": pixels[:, None]}
    yield {"pixel_values": pixels[:, None], "image_sizes": sizes}
    layout = precut_patch_layout(model)
    if layout is not None:
        patch, frames, merge = layout
        side = 2 * merge
        flat = torch.randn(side * side, c * frames * patch * patch, device=device, dtype=dtype)
        yield {"pixel_values": flat, "image_grid_thw": torch.tensor([[1, side, side]], device=device)}
    get = getattr(model, "get_image_features", None)
    if callable(get) and "spatial_shapes" in inspect.signature(get).parameters:
        # SigLIP2 towers (LFM2-VL): a padded patch list; an even grid for towers that merge 2 × 2
        for grid in ((2, 3), (4, 4)):
            probe = _patch_list_probe(model, device, grid)
            if probe is not None:
                yield probe


def _image_token(model: nn.Module) -> int | None:
    """A vision-language model's image placeholder token (``None`` for a model without images)."""
    cfg = getattr(model, "config", None)
    token = getattr(cfg, "image_token_id", None)
    token = getattr(cfg, "image_token_index", None) if token is None else token
    if getattr(cfg, "vision_config", None) is None or not callable(
        getattr(model, "get_image_features", None)
    ):
        return None
    return token if isinstance(token, int) else None


def _with_image(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A vision-language model's probe: the text probe with an image (in the first layout of
    :func:`_image_layouts` its ``get_image_features`` takes) and as many image placeholder tokens
    as its vision tower gives features, so the check covers the vision tower too; ``None`` for a
    model without images (or one whose image input none of those layouts is: its vision tower is
    then checked on the first input with images, :func:`check_images`)."""
    token = _image_token(model)
    if token is None:
        return None
    get = cast(Any, model).get_image_features
    ids = inputs["input_ids"]
    for image in _image_layouts(model, ids.device):
        try:
            with torch.no_grad():
                out = get(**image)
        except Exception:  # noqa: BLE001 - not this layout
            continue
        feats = getattr(out, "pooler_output", out)
        parts = feats if isinstance(feats, (list, tuple)) else [feats]
        if not parts or not all(isinstance(f, torch.Tensor) for f in parts):
            continue
        count = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in parts)
        placeholders = torch.full((1, count), token, dtype=ids.dtype, device=ids.device)
        probe = {**inputs, "input_ids": torch.cat([ids[:, :2], placeholders, ids[:, 2:]], 1), **image}
        if accepts(model, "mm_token_type_ids"):  # Qwen2-VL: 1 marks an image token
            probe["mm_token_type_ids"] = (probe["input_ids"] == token).long()
        return probe
    return None


def _patch_list_probe(
    model: nn.Module, device: torch.device, grid: tuple[int, int] = (2, 3)
) -> dict[str, torch.Tensor] | None:
    """A grid of patches (2 × 3 by default) as SigLIP2's processor lays it out, in a list padded
    by two."""
    size = patch_size(model)
    if size is None:
        return None
    channels = image_shape(model)[0]
    real = grid[0] * grid[1]
    mask = torch.zeros(1, real + 2, dtype=torch.long, device=device)
    mask[:, :real] = 1
    pixels = torch.randn(1, real + 2, size * size * channels, device=device, dtype=model_dtype(model))
    return {
        "pixel_values": pixels,
        "pixel_attention_mask": mask,
        "spatial_shapes": torch.tensor([list(grid)], device=device),
    }


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    name = getattr(model, "main_input_name", None)
    device = input_device(model)
    try:
        if name == "input_ids":
            vocab = cast(Any, input_embeddings(model)).num_embeddings
            ids = torch.arange(5) * 7 % max(vocab, 1)
            cfg = cast(Any, model).config
            eos = end_of_sequence(model, vocab)
            if eos is not None:
                ids[-1] = eos
            inputs = {"input_ids": ids[None].to(device)}
            if (
                getattr(cfg, "is_encoder_decoder", False)
                and "ForSequenceClassification" not in type(model).__name__
            ):
                start = decoder_start(model)
                inputs["decoder_input_ids"] = torch.tensor([[start, int(ids[1]), int(ids[2])]], device=device)
            if is_dual_encoder(model):
                inputs["pixel_values"] = torch.randn(
                    1, *image_shape(model), device=device, dtype=model_dtype(model)
                )
                return inputs
            return _with_image(model, inputs) or inputs
        if name == "pixel_values" and accepts(model, "spatial_shapes"):  # SigLIP2's patch lists
            return _patch_list_probe(model, device)
        if name == "pixel_values" or (name == "inputs" and _takes_images(model)):
            return {name: torch.randn(1, *image_shape(model), device=device, dtype=model_dtype(model))}
    except (AttributeError, NotImplementedError, TypeError):
        return None
    return None


def _apply_entry(
    model: nn.Module,
    entry: PlanEntry,
    stats: dict[str, int],
    named: dict[str, nn.Module],
    undo: list[Callable[[], None]],
    force_ops: bool = False,
) -> None:
    site = Site(model, entry.path, named[entry.path], entry.role, stats, force_ops)
    installed = entry.rule.install(site)
    undo.extend(installed.undo)
    if not installed.noop:
        entry.route = installed.route


def patch(
    model: nn.Module,
    rules: str | Preset | dict[str, Any] = "attnlrp",
    *,
    strict: bool = True,
    verify: bool = True,
) -> Handle:
    """Patch ``model`` in place (this instance only) so that one backward pass yields LRP relevance.

    Parameters
    ----------
    model:
        A HuggingFace ``PreTrainedModel`` or a plain ``torch.nn.Module``.
    rules:
        A preset name (``"attnlrp"``, ``"cp-lrp"``, ``"ah-lrp"``, ``"gradient"``,
        ``"conservative-check"``), a YAML path, a mapping, or a :class:`~lxt_plus.engine.plan.Preset`.
    strict:
        Raise :class:`~lxt_plus.errors.UnsupportedModelError` (before touching the model) when a
        module matches no rule. ``False`` lets such modules pass with plain gradients.
    verify:
        Run one tiny forward pass to prove every norm and attention module was reached by its rule,
        and one with gradients proving every operation on the relevance path has a rule. A plain
        module (not a HuggingFace model) gets no probe input: :func:`~lxt_plus.explain` checks
        its operations on the first input it is given.

    Returns
    -------
    Handle
        ``handle.remove()`` restores the model bit for bit; ``handle.describe()`` prints the plan.

    Notes
    -----
    The patch lasts on this instance until removed: forward values are unchanged for every preset
    except ``conservative-check`` (biases zeroed), but gradients are LRP relevance gradients.
    """
    require_module(model, "patch")
    preset = get_preset(rules)
    with _LOCK:
        existing = _PATCHED.get(model)
        if existing is not None:
            if existing.preset == preset:
                return Handle(model, existing.plan, nested=True, strict=existing.strict)
            raise AlreadyPatchedError(
                f"{type(model).__name__} is already patched with preset {existing.preset.name!r}; "
                f"remove that handle before patching with {preset.name!r}"
            )
        named = dict(model.named_modules())
        # the modules, and the attention implementation the probe ran under (it decides what the
        # operation check sees and what the backward pass keeps)
        attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
        signature = (tuple((p, type(m)) for p, m in named.items()), attn)
        cached = _PLAN_CACHE.get(model, {}).get((preset, strict))
        if cached is not None and cached[0] == signature:
            plan, ops_paths = _copy_plan(cached[1]), cached[2]
        else:
            op_checked = verify and is_hf_model(model) and _probe_inputs(model) is not None
            if verify and is_hf_model(model) and not op_checked:
                warnings.warn(
                    f"lxt_plus could not build a probe input for {type(model).__name__} (main input "
                    f"{getattr(model, 'main_input_name', None)!r}), so the operations on its relevance path "
                    "are not checked and relevance may not be conservative: check it with "
                    "lxt_plus.audit(model, inputs=...) on an input of your own",
                    LxtPlusWarning,
                    stacklevel=3,
                )
            plan = build_plan(model, preset, strict=strict, op_checked=op_checked)
            ops_paths, cached = frozenset(), None
        handle = Handle(model, plan, strict=strict)
        stats: dict[str, dict[str, int]] = {}
        try:
            if any(e.role == "attention" for e in plan.entries) and is_hf_model(model):
                register_keys(_make_attention, handle._undo)
            for entry in plan.entries:
                if entry.route == "none":
                    continue
                stats[entry.path] = {}
                _apply_entry(
                    model, entry, stats[entry.path], named, handle._undo, force_ops=entry.path in ops_paths
                )
                if entry.path in plan.gated:
                    gate_products(named[entry.path], handle._undo)
            _dense_batch_norm_grads(model, handle._undo)
            if preset.zero_bias:
                _zero_biases(model, handle._undo)
            if any(e.route == "registry" for e in plan.entries):
                switch_configs(named.values(), handle._undo)
            _PATCHED[model] = handle
            if verify and cached is None:
                _verify(model, plan, stats, named, handle, strict)
                ops = frozenset(e.path for e in plan.entries if e.route == "ops")
                _PLAN_CACHE.setdefault(model, {})[(preset, strict)] = (signature, _copy_plan(plan), ops)
        except BaseException:
            _PATCHED.pop(model, None)
            handle._active = True
            handle.remove()
            raise
        return handle


def _copy_plan(plan: Plan) -> Plan:
    return Plan(
        plan.preset,
        [PlanEntry(e.path, e.type_name, e.role, e.rule, e.route) for e in plan.entries],
        plan.infos,
        plan.operations,
        plan.gated,
    )


def _verify(
    model: nn.Module,
    plan: Plan,
    stats: dict[str, dict[str, int]],
    named: dict[str, nn.Module],
    handle: Handle,
    strict: bool = True,
) -> None:
    """One tiny forward pass proving each norm and attention rule was reached, then one with grad
    proving every operation on the relevance path is linear or covered by a rule."""
    inputs = _probe_inputs(model) if is_hf_model(model) else None
    if inputs is None:
        return

    def run() -> None:
        for s in stats.values():
            s.clear()
        with torch.no_grad():
            model(**inputs)

    run()
    rerouted = False
    for e in plan.entries:
        if e.route == "registry" and not stats[e.path].get("attention_hits"):
            # the class does not dispatch through the registry after all: rule its inline ops
            ATTENTION_RULES.pop(named[e.path], None)
            _apply_entry(model, e, stats[e.path], named, handle._undo, force_ops=True)
            rerouted = True
    if rerouted:
        run()
    norms = [
        e
        for e in plan.entries
        if e.role == "norm" and e.route != "none" and not stats[e.path].get("norm_hits")
    ]
    _refuse_unseen(model, inputs, norms)
    # an attention rule's inline route counts products of two input-dependent tensors too (linear
    # attention, MiniMax's lightning attention, has no softmax), which only a pass with gradients
    # tells apart from products with weights: the operation check's pass counts them again
    unseen = [e for e in plan.entries if e.route == "ops" and not stats[e.path].get("attention_hits")]
    _check_operations(model, plan, inputs, strict, named, handle._undo)
    _refuse_unseen(model, inputs, [e for e in unseen if not stats[e.path].get("attention_hits")])


def _refuse_unseen(model: nn.Module, inputs: dict[str, torch.Tensor], missed: list[PlanEntry]) -> None:
    """Refuse the plan entries whose rule never saw the operation it changes on the probe input."""
    if missed:  # modules not called at all on the probe input (an unused pooler) are not evidence
        called = _called_modules(model, inputs)
        missed = [e for e in missed if e.path in called]
    if not missed:
        return
    misplaced = [e for e in missed if e.route == "ops" and e.role != "attention"]
    if misplaced:  # an attention rule given to modules that compute no attention
        listing = "; ".join(f"{e.path} ({e.type_name}, {e.role})" for e in misplaced[:8])
        raise UnsupportedModelError(
            f"{type(model).__name__}: rule {misplaced[0].rule.name!r} is an attention rule, and these "
            f"modules compute no attention (no softmax, attention kernel or product of two "
            f"input-dependent tensors ran in them): {listing}. Select attention modules for it (the "
            "'attention' role, or type:/name: of the attention module)"
        )
    listing = "; ".join(f"{e.path} ({e.type_name}, {e.role})" for e in missed[:8])
    raise UnsupportedModelError(
        f"{type(model).__name__}: the rule for these modules never saw the operation it must change, so "
        f"their forward computes it in a way lxt_plus does not recognise: {listing}. "
        "Pass strict=False to let them through with plain gradients, or report the architecture."
    )


def _passes_everything(preset: Preset) -> bool:
    """A preset that ends in ``any -> pass`` chose plain gradients for what it does not name."""
    return any(sel == "any" and rule.is_noop() for sel, rule in preset.rules)


def _check_operations(
    model: nn.Module,
    plan: Plan,
    inputs: dict[str, torch.Tensor],
    strict: bool,
    named: dict[str, nn.Module],
    undo: list[Callable[[], None]],
) -> None:
    if _passes_everything(plan.preset):
        plan.operations = OpReport(checked=False, reason=f"preset {plan.preset.name!r} passes every module")
        return
    rules = {e.path: e.rule for e in plan.entries if e.route != "none"}

    def rule_at(path: str) -> tuple[bool, frozenset[str]]:
        here, covers = path in rules, frozenset[str]()
        for i in range(path.count(".") + 1, -1, -1):  # the module, then each enclosing one
            prefix = ".".join(path.split(".")[:i]) if i else ""
            if prefix in rules and rules[prefix].covers:
                covers = rules[prefix].covers
                break
        return here, covers

    types = {info.path: info.type_name for info in plan.infos}
    embs, added = embedding_leaves(model, tokens="input_ids" in inputs)
    probe = dict(inputs)
    for name, value in probe.items():
        if value.is_floating_point():  # an image: the pixels are the leaf
            probe[name] = value.clone().requires_grad_(True)

    def leaf(module: nn.Module, args: Any, out: Any) -> Any:
        return out.detach().requires_grad_(True).clone() if isinstance(out, torch.Tensor) else out

    flags = [(p, p.requires_grad) for p in model.parameters()]
    hooks = [m.register_forward_hook(leaf) for m in embs + added]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        ids = probe.get("input_ids")
        if is_dual_encoder(model):  # the towers; explain_similarity rules the comparison itself

            def run() -> Any:
                image, text = dual_embeddings(model, **probe)
                return torch.cat([image.flatten(), text.flatten()])
        elif not is_hf_model(model):  # a plain module takes its one input positionally

            def run() -> Any:
                return model(*probe.values())
        else:

            def run() -> Any:
                return model(**probe)

        with offloaded_weights(model) as weights, position_buffer_leaves(model, lambda t: leaf(model, (), t)):
            report = check_operations(
                model,
                run,
                rule_at,
                types,
                zero_bias=plan.preset.zero_bias,
                tokens=ids.shape[-1] if isinstance(ids, torch.Tensor) else 0,
                weights=weights,
            )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for h in hooks:
            h.remove()
    attention = {e.path for e in plan.entries if e.role == "attention" and e.route != "none"}
    gates = {
        f.path for f in report.unknown if f.path in attention and f.kind in ("product", "elementwise")
    } - plan.gated
    if gates:  # an output gate inside attention (Qwen3-Next): rule it as a gated product, check again
        for path in sorted(gates):
            gate_products(named[path], undo)
        plan.gated = plan.gated | gates
        _check_operations(model, plan, inputs, strict, named, undo)
        return
    report.images = any(v.is_floating_point() for v in inputs.values() if isinstance(v, torch.Tensor))
    plan.operations = report
    if report.ok or not report.checked:
        return
    message = (
        f"{type(model).__name__}: {len(report.unknown)} operation(s) on the relevance path have no rule "
        f"in preset {plan.preset.name!r}, so relevance would not be conservative: {report.listing()}"
    )
    if strict:
        raise UnsupportedModelError(
            f"{message}. Add a rule for the module (preset.override('type:ClassName', rule)), or pass "
            "strict=False to let these operations through with plain gradients (not conservative)."
        )
    warnings.warn(
        f"{message}. strict=False: they pass with plain gradients, and the relevance is NOT conservative.",
        LxtPlusWarning,
        stacklevel=4,
    )


def check_images(handle: Handle, inputs: dict[str, Any]) -> None:
    """Check the operations of a vision-language model's vision tower on ``inputs`` (a batch with
    images, on any device: moved to the model's only when the check runs), once per model and plan, where the patch-time probe could build no image for it (an
    image layout of its own: LLaVA-Next's tiles, Mllama's aspect ratios, ...). The patch-time check
    covered the text path only; an unknown operation in the vision tower raises
    :class:`~lxt_plus.errors.UnsupportedModelError` (or warns, with ``strict=False``) here, before
    any relevance is computed."""
    model, plan = handle.model, handle.plan
    report = plan.operations
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if (
        report is None
        or not report.checked
        or report.images
        or _image_token(model) is None
        or not any(v.is_floating_point() for v in tensors.values())
    ):
        return
    device = input_device(model)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    _check_operations(model, plan, tensors, handle.strict, dict(model.named_modules()), handle._undo)
    _remember_operations(handle)


def check_plain(handle: Handle, values: torch.Tensor) -> None:
    """Check the operations of a plain (not HuggingFace) module on the input ``explain`` was given,
    once per model and plan: the patch-time probe cannot build an input for a module it knows
    nothing about, so without this an inline softmax or product in its ``forward`` would pass with
    plain gradients unnoticed. An operation without a rule raises
    :class:`~lxt_plus.errors.UnsupportedModelError` (or warns, with ``strict=False``) before any
    relevance is computed."""
    model, plan = handle.model, handle.plan
    if is_hf_model(model) or plan.operations is not None:
        return
    named = dict(model.named_modules())
    _check_operations(model, plan, {"input": values.detach()}, handle.strict, named, handle._undo)
    _remember_operations(handle)


def _remember_operations(handle: Handle) -> None:
    """Keep an operation check made after patching with the cached plan, so it runs once."""
    with _LOCK:
        cached = _PLAN_CACHE.get(handle.model, {}).get((handle.plan.preset, handle.strict))
        if cached is not None:
            cached[1].operations = handle.plan.operations


def _called_modules(model: nn.Module, inputs: dict[str, torch.Tensor]) -> set[str]:
    called: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, p=p: called.add(p)) for p, m in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return called


class patched:  # noqa: N801 - reads as a context manager
    """``with lxt_plus.patched(model, rules="ah-lrp"): ...`` — patch on entry, restore on exit
    (also when the body raises; the exception propagates)."""

    def __init__(self, model: nn.Module, rules: str | Preset | dict[str, Any] = "attnlrp", **kwargs: Any):
        self.model, self.rules, self.kwargs = model, rules, kwargs
        self.handle: Handle | None = None

    def __enter__(self) -> Handle:
        self.handle = patch(self.model, self.rules, **self.kwargs)
        return self.handle

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None and self.handle.active:
            self.handle.remove()
