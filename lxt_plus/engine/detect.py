"""Recognise what each module of a model *is*: norm, activation, attention, gated MLP, router, ...

Roles come from types and structure, not from per-family maps, so a new architecture built from
known parts is recognised with no new code. A leaf module that matches nothing is ``"unknown"``;
the plan refuses it (or lets it pass with ``strict=False``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lxt_plus.errors import InputError

__all__ = [
    "ROLES",
    "accepts",
    "ModuleInfo",
    "detect_roles",
    "find_block_list",
    "owning_pretrained",
    "is_hf_model",
    "input_device",
    "input_embeddings",
    "image_shape",
    "model_dtype",
    "patch_size",
    "is_added_embedding",
    "is_position_embedding",
    "token_embeddings",
    "embedding_leaves",
    "position_buffers",
    "position_weight_owners",
    "precut_patch_layout",
    "decoder_start",
    "end_of_sequence",
]

ROLES = (
    "attention",
    "activation",
    "norm",
    "mlp",
    "router",
    "ssm",
    "scan_parameter",
    "linear",
    "conv",
    "embedding",
    "dropout",
    "softmax",
    "rotary",
    "structural",
    "head",
    "container",
    "unknown",
)

_ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")
_NOT_ACTIVATION = {
    "Softmax",
    "Softmin",
    "LogSoftmax",
    "Softmax2d",
    "MultiheadAttention",
    "GLU",
    "Threshold",
    "ClassInstantier",
}
_STRUCTURAL = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample,
    nn.ZeroPad2d,
)
# MLA$: multi-head latent attention modules named by the acronym alone (LongcatFlashMLA)
_ATTN_NAME = re.compile(r"(?i:attention|attn)|MLA$")
# parts of an attention block that compute no attention: CvT's convolutional q/k/v projections
_ATTN_PART = re.compile(r"(Projection|Output)$")


def _attention_named(name: str) -> bool:
    return _ATTN_NAME.search(name) is not None and _ATTN_PART.search(name) is None


# blocks whose products are gated products by design, whether or not they hold an activation
# module (an inline F.silu, GPT-OSS's clamped SwiGLU experts, LFM2's gated short convolution)
_GATED_NAME = re.compile(r"(MLP|Mlp|FeedForward|FFN|Ffn|Experts|MoeBlock|MoE|ShortConv)")
_ROUTER_NAME = re.compile(r"Router|Gating")
# element-wise activation modules a family defines itself (BloomGelu, NewGELUActivation, ...)
_ACTIVATION_NAME = re.compile(r"(Ge[Ll][Uu]|SiLU|Silu|Swish|Mish|ReLU|Relu|Activation)\d*$")
_NORM_NAME = re.compile(r"Norm($|[A-Z0-9_])|GRN$")  # GRN: ConvNeXt-V2's global response norm


@dataclass
class ModuleInfo:
    """A module and what it was recognised as."""

    path: str
    module: nn.Module
    role: str
    note: str = ""

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def is_hf_model(module: nn.Module) -> bool:
    from transformers import PreTrainedModel  # a dependency; imported here to keep import time short

    return isinstance(module, PreTrainedModel)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` (a dual encoder's: its text tower's), or ``None`` for a
    model that has none (an image model: transformers raises ``NotImplementedError`` for ResNet,
    CLIP's image classifier and others)."""
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        text = getattr(model, "text_model", None)  # CLIP's dual encoder: its text tower's
        return input_embeddings(text) if isinstance(text, nn.Module) and text is not model else None
    return emb if isinstance(emb, nn.Module) else None


def image_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images the model's config describes (its own, or its
    ``vision_config``); 224 pixels and 3 channels where the config does not say."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", None) or cfg
    size: Any = getattr(cfg, "image_size", None) or 224
    if isinstance(size, dict):
        size = (size.get("height", 224), size.get("width", 224))
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return int(getattr(cfg, "num_channels", None) or 3), h, w


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none): what a
    probe input is made in."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def patch_size(model: nn.Module) -> int | None:
    """The model's patch size in pixels (its config's, or its vision config's), if it has one."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "vision_config", None) or cfg
    size = getattr(cfg, "patch_size", None)
    if isinstance(size, (list, tuple)) and size:
        size = size[0]
    return int(size) if isinstance(size, int) and not isinstance(size, bool) else None


def precut_patch_layout(model: nn.Module) -> tuple[int, int, int] | None:
    """``(patch, temporal, merge)`` sizes of a vision tower that takes pre-cut patches (Qwen2-VL's
    ``patch_size``, ``temporal_patch_size`` and ``spatial_merge_size``), or ``None``."""
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    sizes = [getattr(vision, n, None) for n in ("patch_size", "temporal_patch_size", "spatial_merge_size")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        return None
    patch, frames, merge = (int(v) for v in cast(list[int], sizes))
    return patch, frames, merge


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the token embeddings' device, else the first parameter not on ``meta``
    (accelerate's offloading leaves placeholders on ``meta``)."""
    emb = input_embeddings(model) if is_hf_model(model) else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


_POSITION_TABLE = re.compile(r"Position(al)?Embedding")


def is_added_embedding(m: nn.Module, path: str = "") -> bool:
    """An embedding whose output is added to the token embeddings: positions, token types, and
    position tables that are not ``nn.Embedding`` (XGLM's sinusoidal one); not rotary tables, and
    not an attention-score bias table (T5's ``relative_attention_bias``, which only shifts scores).
    Explaining makes their outputs leaves, so the relevance they take is reported."""
    if "bias" in path.rsplit(".", 1)[-1]:
        return False
    name = type(m).__name__
    if isinstance(m, nn.Embedding):
        return True
    return (
        _POSITION_TABLE.search(name) is not None
        and "Rotary" not in name
        and not any(True for _ in m.children())
    )


_POSITION_NAME = re.compile(r"(^|_)(pos|position|positions|wpe|positional)(_|$)|position")


def position_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Position tables that a module holds as a buffer and indexes in ``forward`` (CTRL's
    sinusoidal ``pos_encoding``), not as an embedding module: 2-D floating-point buffers named for
    positions, outside added embedding modules (whose outputs are leaves already) and rotary
    tables. Explaining turns what is read from them into position leaves
    (:func:`lxt_plus.engine.positional.position_buffer_leaves`)."""
    found = []
    for path, m in model.named_modules():
        if is_added_embedding(m, path) or "Rotary" in type(m).__name__:
            continue
        for name, b in m.named_buffers(recurse=False):
            if (
                b.is_floating_point()
                and b.dim() == 2
                and _POSITION_NAME.search(name.lower()) is not None
                and "bias" not in name
                and "freq" not in name
            ):
                found.append(b)
    return found


def position_weight_owners(model: nn.Module) -> dict[nn.Module, list[torch.Tensor]]:
    """The modules holding a position embedding (learned, 2-D), with its weight: a module may read
    that weight whole in ``forward`` and resize it to the input (SigLIP2's patch grid, GLM-4V's)
    rather than call the embedding; explaining then turns the read into a position leaf
    (:func:`lxt_plus.engine.positional.position_buffer_leaves`). Only embedding stages count, not
    a module that also runs a stack of layers (GPT-2's model holds ``wpe``): reads are watched
    while the owner runs, which must stay a few operations."""
    named = dict(model.named_modules())
    owners: dict[nn.Module, list[torch.Tensor]] = {}
    for path, m in named.items():
        weight = getattr(m, "weight", None)
        if (
            path
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.is_floating_point()
            and is_added_embedding(m, path)
            and is_position_embedding(m, path)
        ):
            owner = named[path.rpartition(".")[0]]
            if not any(isinstance(c, nn.ModuleList) for c in owner.modules()):
                owners.setdefault(owner, []).append(weight)
    return owners


def is_position_embedding(m: nn.Module, path: str = "") -> bool:
    """An added embedding that encodes positions (learned or sinusoidal), not token types or
    segments: its relevance is the position's (PA-LRP, Bakish et al. 2025)."""
    last = path.rsplit(".", 1)[-1].lower()
    if "type" in last or "segment" in last:
        return False
    return _POSITION_TABLE.search(type(m).__name__) is not None or _POSITION_NAME.search(last) is not None


def token_embeddings(model: nn.Module) -> list[nn.Module]:
    """The modules that embed ``input_ids``: ``get_input_embeddings()``, or, for an encoder-decoder
    whose encoder and decoder hold embedding modules of their own (BART's share one weight), those
    two, encoder first. T5's encoder and decoder call the one shared module."""
    hf = cast(Any, model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        found: list[nn.Module] = []
        for part in ("get_encoder", "get_decoder"):
            try:
                stack = getattr(hf, part)()
            except (AttributeError, NotImplementedError, TypeError):
                continue
            try:
                emb = stack.get_input_embeddings()
            except (AttributeError, NotImplementedError, TypeError):
                # a stack that is no pretrained model of its own (FSMT's encoder and decoder)
                emb = getattr(stack, "embed_tokens", None)
            if isinstance(emb, nn.Module) and all(emb is not f for f in found):
                found.append(emb)
        if found:
            return found
    emb = input_embeddings(model)
    return [] if emb is None else [emb]


def embedding_leaves(model: nn.Module, tokens: bool = True) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(token embeddings, added embeddings)``: the modules whose outputs explaining (and the
    patch-time operation check) turn into leaves that require grad. With ``tokens=False`` (an
    image input, whose pixels are the leaf) only the added ones: CLIP's position table."""
    embs = token_embeddings(model)
    added = [
        m
        for path, m in model.named_modules()
        if all(m is not e for e in embs) and is_added_embedding(m, path)
    ]
    return (embs if tokens else []), added


def end_of_sequence(model: nn.Module, vocab: int) -> int | None:
    """The configured end-of-sequence id (the first of a list), if it is a token of ``vocab``;
    BART-style classification heads read the last one, so synthetic inputs end with it."""
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return eos if isinstance(eos, int) and 0 <= eos < vocab else None


def decoder_start(model: nn.Module) -> int:
    """The id an encoder-decoder's decoder starts from: ``decoder_start_token_id``, else the pad id
    (T5's convention), else 0."""
    cfg = cast(Any, model).config
    start = getattr(cfg, "decoder_start_token_id", None)
    if isinstance(start, int):
        return start
    pad = getattr(cfg, "pad_token_id", None)
    return pad if isinstance(pad, int) else 0


def owning_pretrained(model: nn.Module, path: str) -> nn.Module | None:
    """The innermost ``PreTrainedModel`` on the path from ``model`` to the module at ``path``."""
    owner = model if is_hf_model(model) else None
    current = model
    for part in [p for p in path.split(".") if p]:
        current = getattr(current, part)
        if is_hf_model(current):
            owner = current
    return owner


def _is_activation(m: nn.Module) -> bool:
    cls = type(m)
    if cls.__name__ in _NOT_ACTIVATION or any(True for _ in m.children()):
        return False
    if cls.__module__ in _ACTIVATION_MODULES:
        return True
    # a family's own activation: an element-wise module without weights of its own
    return _ACTIVATION_NAME.search(cls.__name__) is not None and not any(True for _ in m.parameters())


def _is_conv1d_hf(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _leaf_role(name: str, m: nn.Module) -> str:
    last = name.rsplit(".", 1)[-1]
    cls_name = type(m).__name__
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return "dropout"
    if isinstance(m, nn.Linear) or _is_conv1d_hf(m) or isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "linear"  # BatchNorm in eval mode is affine
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return "softmax"
    if _is_activation(m):
        return "activation"
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)) or _NORM_NAME.search(cls_name):
        return "norm"
    if "Rotary" in cls_name or "RoPE" in cls_name or last in ("rotary_emb", "rotary_embedding"):
        return "rotary"
    if "Router" in cls_name or last in ("router", "expert_gate") or last.endswith("expert_gate"):
        return "router"
    if isinstance(m, _STRUCTURAL):
        return "structural"
    if _attention_named(cls_name):
        return "attention"
    return "unknown"


def detect_roles(model: nn.Module) -> list[ModuleInfo]:
    """Recognise every module of ``model``; returns them in ``named_modules`` order."""
    named = dict(model.named_modules())
    children = {p: [c for c in named if c.startswith(p + ".") or (p == "" and c != "")] for p in named}

    def has(path: str, role_pred) -> bool:  # type: ignore[no-untyped-def]
        return any(role_pred(c) for c in children[path])

    roles: dict[str, str] = {}
    # 1. leaves (and modules that are leaves for our purposes)
    for path, m in named.items():
        if not any(True for _ in m.children()):
            roles[path] = _leaf_role(path, m)
    # norms that apply their activation themselves (BiT's BitGroupNormActivation)
    for path, m in named.items():
        if path not in roles and isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            roles[path] = "norm"
    # routers that are plain Linear layers next to a set of experts (``gate`` in an MoE block)
    for path in named:
        last = path.rsplit(".", 1)[-1]
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if roles.get(path) not in ("linear", "unknown"):
            continue
        if last.endswith("expert_gate"):  # sigmoid gate of a shared expert
            roles[path] = "router"
        elif last in ("gate", "router") and parent in named:
            siblings = [type(c).__name__ for c in named[parent].children()]
            if any("Expert" in s for s in siblings) or hasattr(named[parent], "experts"):
                roles[path] = "router"
    # selective state-space mixers (Mamba): the module holding the scan's A_log; a gate module
    # holding it beside the mixer's convolution (Kimi's and Bailing's forget gate) computes a scan
    # parameter, and its parent is the mixer
    for path, m in named.items():
        if path not in roles and isinstance(getattr(m, "A_log", None), nn.Parameter):
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            holder = named.get(parent)
            if (
                path != ""
                and not isinstance(getattr(m, "conv1d", None), nn.Conv1d)
                and isinstance(getattr(holder, "conv1d", None), nn.Conv1d)
            ):
                roles[path] = "scan_parameter"
                roles.setdefault(parent, "ssm")
            else:
                roles[path] = "ssm"
    # routers with a child of their own (a Linear inside AfmoeTokenChoiceRouter, JetMoE's gating)
    for path, m in named.items():
        if (
            path not in roles
            and _ROUTER_NAME.search(type(m).__name__)
            and not hasattr(m, "experts")
            # a gated MLP (MoshiGatingMLP) holds its activation; a router does not
            and not has(path, lambda c: roles.get(c) == "activation")
        ):
            roles[path] = "router"
    # 2. attention modules with children: the innermost attention-named module
    for path, m in named.items():
        if path in roles:
            continue
        if (
            _attention_named(type(m).__name__)
            and not has(path, lambda c: _attention_named(type(named[c]).__name__))
            # a linear-attention layer whose mixer is a scan (OLMo-Hybrid's GatedDeltaNet layer)
            and not has(path, lambda c: roles.get(c) == "ssm")
        ):
            roles[path] = "attention"

    # 3. MLP blocks: maximal modules holding an activation and no attention
    def mlp_like(p: str) -> bool:
        m = named[p]
        return (
            p not in roles
            and not isinstance(m, (nn.ModuleList, nn.ModuleDict))
            and (
                has(p, lambda c: roles.get(c) == "activation")
                or _GATED_NAME.search(type(m).__name__) is not None
            )
            and not has(p, lambda c: roles.get(c) == "attention")
        )

    candidates = {p for p in named if p != "" and mlp_like(p)}
    for path in candidates:
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if parent not in candidates:  # maximal: nested blocks must not apply the rule twice
            roles[path] = "mlp"
    if "" not in roles and not is_hf_model(model) and mlp_like(""):
        roles[""] = "mlp"  # a plain torch MLP
    # 4. the task head of a HF model: inline non-linearities outside the backbone
    if is_hf_model(model) and "" not in roles:
        base = getattr(model, "base_model", model)
        if base is not model:
            roles[""] = "head"
    infos = []
    for path, m in named.items():
        role = roles.get(path, "container")
        infos.append(ModuleInfo(path, m, role))
    return infos


def find_block_list(
    model: nn.Module, infos: list[ModuleInfo] | None = None
) -> tuple[str, nn.ModuleList] | None:
    """The list of transformer blocks: the longest ``nn.ModuleList`` whose items hold attention.

    Items without attention are allowed (hybrid models interleave other blocks), but at least one
    must hold (or be) a module of role ``"attention"``. A list inside an item of another such list
    is a block's parts, not the blocks (T5's ``block.0.layer``: self-attention, cross-attention, MLP),
    whatever its length. Returns ``(path, list)``, or ``None`` if none exists.
    """
    infos = detect_roles(model) if infos is None else infos
    attention = [i.path for i in infos if i.role == "attention"]
    found: list[tuple[str, nn.ModuleList]] = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        prefix = f"{path}." if path else ""
        if any(a.startswith(prefix) and a[len(prefix) :].split(".")[0].isdigit() for a in attention):
            found.append((path, m))
    outer = [(p, m) for p, m in found if not any(p.startswith(f"{q}.") for q, _ in found if q != p)]
    # a vision-language model's blocks are its language model's, where text and image tokens meet
    # (not its vision tower's, whatever their number): the lists beside the token embeddings
    home = _token_embedding_owner(model)
    near = [(p, m) for p, m in outer if home and p.startswith(f"{home}.")]
    return max(near or outer, key=lambda c: len(c[1]), default=None)


def _token_embedding_owner(model: nn.Module) -> str:
    """The path of the module that holds the token embeddings (``model.language_model``), or ``""``."""
    try:
        embs = token_embeddings(model)
    except (AttributeError, NotImplementedError, TypeError):
        return ""
    paths = {id(m): p for p, m in model.named_modules()}
    path = paths.get(id(embs[0]), "") if embs else ""
    return path.rsplit(".", 1)[0] if "." in path else ""


def accepts(model: nn.Module, name: str) -> bool:
    """Whether the model's (class) ``forward`` takes the argument ``name``; the instance forward may
    be a patch's wrapper, whose signature is ``*args, **kwargs``."""
    try:
        return name in inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):
        return False


def require_module(model: Any, caller: str) -> None:
    """An :class:`InputError` unless ``model`` is a torch module (a model name, a path or a
    tokenizer passed by mistake fails here, not deep inside the call)."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"{caller}() needs a torch module (a transformers model), got {type(model).__name__}; "
            "load one first, e.g. AutoModelForCausalLM.from_pretrained(...)"
        )
