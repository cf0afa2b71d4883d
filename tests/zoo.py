"""The architecture zoo: a tiny random config of every text and image model class transformers exports.

For each model type of the auto mappings (CausalLM, SequenceClassification, Seq2SeqLM, MaskedLM)
:func:`tiny_config` shrinks the default config generically (sizes, layer counts, experts, per-layer
lists); for ImageClassification :func:`tiny_vision_config` does the same for image sizes and
stages. :func:`build` makes the model, and :func:`status` runs it under a preset:

- ``conserves``: with biases zeroed under ``conservative-check``, relevance (tokens, positions)
  sums to the target logit to 1e-4 relative; under another preset, explain runs and is finite;
- ``refused``: an ``UnsupportedModelError`` naming the operation or module;
- ``wrong``: relevance returned without an error that does not conserve (the worst bug);
- ``failed``: any other exception (a bug too).

A config that transformers cannot build small (a required sub-config, a kernel-only model) is
``not built``, with the reason; it says nothing about lxt_plus.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf
from transformers.models.auto import modeling_auto as ma

import lxt_plus
from lxt_plus.engine.detect import image_shape
from lxt_plus.errors import UnsupportedModelError

HEADS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "seqcls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "image-cls": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    "image-text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
}
VISION_HEADS = ("image-cls",)
VOCAB = 128
IMAGE_TOKEN = VOCAB - 1
MAX_PARAMETERS = 3_000_000
_SIZES: dict[int, tuple[str, ...]] = {
    32: (
        "hidden_size",
        "d_model",
        "n_embd",
        "dim",
        "embed_dim",
        "model_dim",
        "embedding_size",
        "word_embed_proj_dim",
        "projection_dim",
        "d_embed",
        "hidden_dim_size",
    ),
    64: (
        "intermediate_size",
        "d_ff",
        "ffn_dim",
        "n_inner",
        "encoder_ffn_dim",
        "decoder_ffn_dim",
        "hidden_dim",
        "ffn_hidden_size",
        "mlp_dim",
        "inner_hidden_size",
    ),
    2: (
        "num_hidden_layers",
        "n_layer",
        "n_layers",
        "num_layers",
        "encoder_layers",
        "decoder_layers",
        "num_decoder_layers",
        "num_encoder_layers",
    ),
    4: (
        "num_attention_heads",
        "n_head",
        "n_heads",
        "encoder_attention_heads",
        "decoder_attention_heads",
        "num_heads",
        "num_local_experts",
        "num_experts",
        "n_routed_experts",
        "moe_num_experts",
    ),
    8: (
        "head_dim",
        "d_kv",
        "attention_head_dim",
        "qk_rope_head_dim",
        "qk_nope_head_dim",
        "v_head_dim",
        "sliding_window",
        "local_attention",
        "attention_window",
        "rotary_dim",
        "block_size",
    ),
    16: (
        "kv_lora_rank",
        "q_lora_rank",
        "state_size",
        "ssm_state_size",
        "expand_size",
        "time_step_rank",
        "mamba_d_state",
        "mamba_d_head",
        "mamba_n_heads",
        "conv_L_cache",
    ),
    64 + 1: ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_sequence_length"),
}
_MOE = {
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "expert_intermediate_size": 32,
    "num_experts_per_tok": 2,
    "top_k": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "num_key_value_heads": 2,
    "num_kv_heads": 2,
    "n_kv_heads": 2,
    "multi_query_group_num": 2,
    "vocab_size": VOCAB,
    "n_vocab": VOCAB,
    "initializer_range": 0.2,
    "type_vocab_size": 2,
}
_TOKENS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "unk_token_id",
)


def model_types(head: str) -> list[str]:
    return sorted(getattr(ma, HEADS[head][0]))


def _layer_list(value: list[Any], n: int) -> list[Any]:
    """A per-layer list cut to ``n`` layers, keeping one layer of each distinct kind if it can."""
    firsts = [i for i, v in enumerate(value) if v not in value[:i]]
    picked = sorted(set(firsts[:n]) | set(range(n - len(firsts[:n]))))[:n]
    return [value[i] for i in picked]


def _config_fixes(base: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Sizes the generic shrinking leaves inconsistent: Mamba heads that must tile the mixer's inner
    width (FalconH1, Mamba2), hybrids with no attention layer among the layers kept (Jamba,
    GraniteMoeHybrid), DeepSeek's routing counts left ``None`` by default, and DBRX's nested
    attention and expert configs (its attention needs ``clip_qkv`` set: transformers clamps with
    ``None`` bounds otherwise)."""
    fixes: dict[str, Any] = {}
    hidden = kwargs.get("hidden_size", getattr(base, "hidden_size", None))
    expand, heads = (
        getattr(base, "mamba_expand", None),
        kwargs.get("mamba_n_heads", getattr(base, "mamba_n_heads", None)),
    )
    if (
        isinstance(expand, int)
        and isinstance(heads, int)
        and isinstance(hidden, int)
        and hasattr(base, "mamba_d_head")
    ):
        fixes["mamba_n_heads"] = heads = min(heads, 4)
        fixes["mamba_d_head"] = expand * hidden // heads
        if hasattr(base, "mamba_d_ssm"):
            fixes["mamba_d_ssm"] = expand * hidden
    if base.model_type == "mamba2" and isinstance(hidden, int):  # heads x head width = expand x hidden
        fixes["num_heads"], fixes["head_dim"], fixes["n_groups"] = 4, base.expand * hidden // 4, 1
    if hasattr(base, "n_routed_experts"):
        for name in ("num_experts_per_tok", "n_group", "topk_group"):
            if getattr(base, name, 0) is None:
                fixes[name] = _MOE[name]
    # hybrids whose default puts no attention layer among the first two: one of each kind
    if isinstance(getattr(base, "attn_layer_period", None), int):  # Jamba
        fixes["attn_layer_period"], fixes["attn_layer_offset"] = 2, 1
    types = kwargs.get("layer_types", vars(base).get("layer_types"))  # a field, not a derived property
    if isinstance(types, list) and types and set(types) == {"linear_attention"}:  # GraniteMoeHybrid
        fixes["layer_types"], fixes["num_hidden_layers"] = ["linear_attention", "attention"], 2
    if base.model_type == "dbrx":
        fixes["attn_config"] = {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}
        fixes["ffn_config"] = {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}
    return fixes


def tiny_config(model_type: str) -> Any:
    base = tf.AutoConfig.for_model(model_type)
    kwargs: dict[str, Any] = {}
    for value, names in _SIZES.items():
        size = 64 if value == 65 else value
        for name in names:
            if isinstance(getattr(base, name, None), int) and not isinstance(getattr(base, name), bool):
                kwargs[name] = size
    for name, size in _MOE.items():
        if isinstance(getattr(base, name, None), int) and not isinstance(getattr(base, name), bool):
            kwargs[name] = size
    for name in list(kwargs):  # a derived attribute (Falcon's head_dim) cannot be set
        if isinstance(getattr(type(base), name, None), property):
            del kwargs[name]
    if isinstance(getattr(base, "kv_lora_rank", None), int):  # multi-head latent attention: no GQA
        for name in ("num_key_value_heads", "num_kv_heads"):
            if name in kwargs:
                kwargs[name] = 4
    layers = getattr(base, "num_hidden_layers", None)
    for name, value in vars(base).items():
        if isinstance(value, list) and layers and len(value) == layers and layers > 2:
            cut = _layer_list(value, 2)
            kwargs[name] = cut
    if "layer_types" in kwargs:
        kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    kwargs.update(_config_fixes(base, kwargs))
    cfg = tf.AutoConfig.for_model(model_type, **kwargs)
    vocab = getattr(cfg, "vocab_size", VOCAB) or VOCAB
    for name in _TOKENS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(cfg, name, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}.get(name, 3))
        elif isinstance(value, list):
            setattr(cfg, name, [v if v < vocab else 2 for v in value])
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0
    cfg.num_labels = 3
    return cfg


# ---------------------------------------------------------------------------------------- images
IMAGE = 32
_VISION_INTS = {
    "image_size": IMAGE,
    "patch_size": 4,
    "hidden_size": 32,
    "embed_dim": 16,
    "embedding_size": 8,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "window_size": 2,
    "projection_dim": 16,
    "d_model": 32,
    "hidden_dim": 32,
    "num_groups": 2,
    "stem_out_channels": 8,
    "decoder_hidden_size": 16,
    "max_position_embeddings": 64,
    "vocab_size": VOCAB,
    "encoder_stride": 4,
    "pooler_output_size": 32,
}
_STAGE_SIZES = (8, 16, 16, 32, 32, 32, 32)
# families whose sizes the generic rules cannot derive (stage tuples of many kinds)
_VISION_OVERRIDES: dict[str, dict[str, Any]] = {
    "swin": {"image_size": 64, "embed_dim": 16, "num_heads": [1, 2, 2, 4], "window_size": 2},
    "swinv2": {"image_size": 64, "embed_dim": 16, "num_heads": [1, 2, 2, 4], "window_size": 2},
    "donut-swin": {"image_size": 64, "embed_dim": 16, "num_heads": [1, 2, 2, 4], "window_size": 2},
    # CvT indexes its drop-path rates by stage: stage i needs more than i blocks
    "cvt": {"embed_dim": [16, 32, 32], "num_heads": [1, 2, 2], "depth": [1, 2, 3]},
    "mobilenet_v1": {"depth_multiplier": 0.25},
    "mobilenet_v2": {"depth_multiplier": 0.25},
    "levit": {
        "image_size": 64,
        "patch_size": 16,
        "hidden_sizes": [16, 32, 48],
        "num_attention_heads": [2, 2, 2],
        "depths": [1, 1, 1],
        "key_dim": [8, 8, 8],
        "down_ops": [["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 4, 4, 2, 2]],
    },
    "mobilevitv2": {
        "image_size": 64,
        "patch_size": 2,
        "width_multiplier": 0.25,
        "n_attn_blocks": [1, 1, 1],
        "base_attn_unit_dims": [16, 16, 16],
    },
    # its last norm has hidden_dim channels, which must be round_filters(1280) at this width
    "efficientnet": {"width_coefficient": 0.25, "depth_coefficient": 0.2, "hidden_dim": 320},
    "hgnet_v2": {
        "embedding_size": 8,
        "hidden_sizes": [16, 16, 32, 32],
        "stem_channels": [3, 8, 8],
        "stage_in_channels": [8, 16, 16, 32],
        "stage_mid_channels": [8, 8, 16, 16],
        "stage_out_channels": [16, 16, 32, 32],
        "stage_num_blocks": [1, 1, 1, 1],
        "stage_numb_of_layers": [2, 2, 2, 2],
    },
    "deit": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
    "perceiver": {
        "d_latents": 32,
        "num_latents": 8,
        "d_model": 32,
        "num_self_attends_per_block": 1,
        "num_self_attention_heads": 2,
        "num_cross_attention_heads": 1,
        "image_size": 16,
    },
    "imagegpt": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "image_size": 8},
}


def _vision_list(value: list[Any], name: str) -> list[Any] | None:
    if not value or not all(isinstance(x, int) and not isinstance(x, bool) for x in value) or len(value) > 7:
        return None
    if "depth" in name or name in ("num_blocks", "stage_num_blocks", "num_block_repeats"):
        return [1] * len(value)
    if "head" in name:
        return [1, 2, 2, 4, 4, 4, 4][: len(value)]
    if name in ("hidden_sizes", "embed_dims", "embed_dim", "hidden_dims", "neck_hidden_sizes", "widths"):
        return list(_STAGE_SIZES[: len(value)])
    return None


def _shrink_vision(base: Any, overrides: dict[str, Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for name, value in vars(base).items():
        if name in ("stage_names", "_out_features", "_out_indices", "out_features", "out_indices"):
            continue
        if isinstance(value, tf.PretrainedConfig) and name.endswith("_config"):
            kwargs[name] = _shrink_vision(value, {}).to_dict()
        elif isinstance(value, int) and not isinstance(value, bool) and name in _VISION_INTS:
            kwargs[name] = _VISION_INTS[name]
        elif isinstance(value, (list, tuple)):
            cut = _vision_list(list(value), name)
            if cut is not None:
                kwargs[name] = cut
    kwargs.update(overrides)
    data = {
        k: v for k, v in base.to_dict().items() if k not in ("out_features", "out_indices", "stage_names")
    }
    data.update({k: v for k, v in kwargs.items() if not isinstance(getattr(type(base), k, None), property)})
    return type(base)(**data)


def tiny_vision_config(model_type: str) -> Any:
    """A small config of an image classifier: 32-pixel images (64 where the stages need it), one
    block per stage, 8-32 channels; nested vision configs (CLIP, SigLIP) shrunk the same way."""
    cfg = _shrink_vision(tf.AutoConfig.for_model(model_type), _VISION_OVERRIDES.get(model_type, {}))
    cfg.num_labels = 3
    names = getattr(ma, HEADS["image-cls"][0])[model_type]
    if isinstance(names, (tuple, list)):  # several classes for one config (DeiT's with a teacher)
        cfg.architectures = [names[0]]
    return cfg


_SPECIAL_IMAGE_TOKENS = (
    "video_token_id",
    "boi_token_id",
    "eoi_token_id",
    "image_start_token_id",
    "image_end_token_id",
)


def _vision_side(vision: Any) -> int:
    """Patches per side of a vision config's image (0 when it has no fixed image size)."""
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    return size // patch if isinstance(size, int) and isinstance(patch, int) and patch else 0


def tiny_vlm_config(model_type: str) -> Any:
    """A vision-language model from the tiny text config of its language model and the tiny vision
    config of its vision tower; the image placeholder token moved into the small vocabulary."""
    base = tf.AutoConfig.for_model(model_type)
    data = base.to_dict()
    text = getattr(base, "text_config", None)
    if text is not None:
        data["text_config"] = small_text = tiny_config(text.model_type).to_dict()
        rope = small_text.get("rope_parameters")
        if isinstance(rope, dict) and ("_vl" in text.model_type or "v_text" in text.model_type):
            # multimodal rotary sections (time, height, width) summing to half the head width
            half = (
                small_text.get("head_dim") or small_text["hidden_size"] // small_text["num_attention_heads"]
            )
            half //= 2
            rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    width = data.get("text_config", {}).get("hidden_size")
    vision = getattr(base, "vision_config", None)
    if vision is not None:
        small = _shrink_vision(vision, {})
        data["vision_config"] = small.to_dict()
        side = _vision_side(small)
        if isinstance(data.get("mm_tokens_per_image"), int) and side:
            data["mm_tokens_per_image"] = (side // 2) ** 2  # Gemma3 pools the patches to this many tokens
        pixels = data["vision_config"].get("image_size")
        if isinstance(data.get("image_grid_pinpoints"), list) and isinstance(pixels, int):
            data["image_grid_pinpoints"] = [[pixels, 2 * pixels]]  # LLaVA-Next's tiles: two and the whole
        vis = data["vision_config"]
        if isinstance(vis.get("depth"), int):  # Qwen-VL towers count their blocks as depth
            vis["depth"] = 2
            if isinstance(vis.get("deepstack_visual_indexes"), list):
                vis["deepstack_visual_indexes"] = [0]
        if isinstance(vis.get("num_heads"), int):
            vis["num_heads"] = 4
        heads = vis.get("num_attention_heads") or vis.get("num_heads")
        if (
            isinstance(vis.get("head_dim"), int)
            and isinstance(heads, int)
            and isinstance(vis.get("hidden_size"), int)
        ):
            vis["head_dim"] = vis["hidden_size"] // heads  # Pixtral (Mistral3) keeps its full-size head width
        layers = vis.get("num_hidden_layers")
        if isinstance(data.get("vision_feature_layer"), list) and isinstance(layers, int):
            data["vision_feature_layer"] = [-2, -1]  # VipLlava's taps: the last two layers kept
        if all(isinstance(vis.get(n), int) for n in ("window_size", "patch_size", "spatial_merge_size")):
            # Qwen2.5-VL's window attention: windows of two merged patches a side
            vis["window_size"] = 2 * vis["patch_size"] * vis["spatial_merge_size"]
            if isinstance(vis.get("fullatt_block_indexes"), list):
                vis["fullatt_block_indexes"] = [1]  # one full-attention block of the two
        if isinstance(width, int) and "out_hidden_size" in data["vision_config"]:
            data["vision_config"]["out_hidden_size"] = (
                width  # Qwen2.5-VL's merger projects into the text width
            )
    if isinstance(data.get("projection_dim"), int) and isinstance(width, int):
        data["projection_dim"] = width  # PaliGemma projects the image features into the text width
    for name in ("image_token_id", "image_token_index"):
        if isinstance(data.get(name), int):
            data[name] = IMAGE_TOKEN
    for i, name in enumerate(_SPECIAL_IMAGE_TOKENS):
        if isinstance(data.get(name), int):
            data[name] = VOCAB - 2 - i
    return type(base)(**data)


def build(model_type: str, head: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if head in VISION_HEADS:
        cfg = tiny_vision_config(model_type)
    elif head == "image-text":
        cfg = tiny_vlm_config(model_type)
    else:
        cfg = tiny_config(model_type)
    auto = getattr(tf, HEADS[head][1])
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # count first: a size the shrinking missed must not fill memory
            size = sum(p.numel() for p in auto.from_config(cfg).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"{size:,} parameters after shrinking (a size attribute the zoo does not know)")
        model = auto.from_config(cfg)
    if head in VISION_HEADS:
        _reinitialise(model, seed)
        # float64: deep stacks of tiny convolutions cancel to small logits, where float32 rounding
        # alone exceeds the 1e-4 tolerance; the verdict is about the rules, not the precision
        model = model.double()
    return model.eval()


def _reinitialise(model: torch.nn.Module, seed: int) -> None:
    """Weights scaled to keep activations of order one through every stage (some families
    initialise their classifier to zero, and deep stacks of tiny convolutions vanish), norm weights
    and biases non-zero, batch-norm statistics of a trained model: a zero logit would test nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() >= 2:
                fan_in = max(p[0].numel(), 1)
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # norm weights, layer scales, learned tokens
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def _forward_params(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


@dataclass
class Status:
    model_type: str
    head: str
    preset: str
    status: str  # conserves | runs | refused | wrong | failed | not built
    detail: str = ""
    error: float | None = None  # relative conservation error (conservative-check)


def _vlm_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Text with as many image placeholders as the vision tower gives features, and one image."""
    from lxt_plus.engine.patching import _with_image

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.tensor([[5, 6, 7, 8, 9]]) % vocab
    inputs = _with_image(model, {"input_ids": ids}) or _tile_inputs(model, ids)
    if inputs is None:
        raise ValueError(
            "no plain image input: the model needs processor-specific inputs (image sizes, grids)"
        )
    gen = torch.Generator().manual_seed(0)
    pixels = inputs["pixel_values"]
    inputs["pixel_values"] = torch.randn(pixels.shape, generator=gen, dtype=pixels.dtype)
    return inputs


def _tile_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """LLaVA-Next's layout, which the patch-time probe does not build: one image as its tiles
    ``(1, tiles, C, H, W)`` with its size, the tile count from the grid pinpoints."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pinpoints = getattr(model.config, "image_grid_pinpoints", None)
    if not pinpoints:
        return None
    channels, side, _ = image_shape(model)
    tiles = image_size_to_num_patches((side, side), pinpoints, side)
    pixels = torch.randn(1, tiles, channels, side, side, dtype=next(model.parameters()).dtype)
    sizes = torch.tensor([[side, side]])
    try:
        with torch.no_grad():
            feats = model.get_image_features(pixel_values=pixels, image_sizes=sizes)
    except Exception:  # noqa: BLE001 - not this layout either
        return None
    feats = getattr(feats, "pooler_output", feats)
    count = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
    placeholders = torch.full((1, count), IMAGE_TOKEN)
    return {
        "input_ids": torch.cat([ids[:, :2], placeholders, ids[:, 2:]], 1),
        "pixel_values": pixels,
        "image_sizes": sizes,
    }


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if "pixel_values" in _forward_params(model) and getattr(model.config, "vision_config", None) is not None:
        if getattr(model, "main_input_name", "input_ids") == "input_ids":
            return _vlm_inputs(model)
    if getattr(model, "main_input_name", "input_ids") != "input_ids":  # an image (ImageGPT takes ids)
        gen = torch.Generator().manual_seed(0)
        dtype = next(model.parameters()).dtype
        if "spatial_shapes" in _forward_params(model):  # SigLIP2: a 3 x 4 grid in a list of 16 patches
            from lxt_plus.engine.detect import patch_size

            values = image_shape(model)[0] * patch_size(model) ** 2
            mask = torch.zeros(1, 16, dtype=torch.long)
            mask[:, :12] = 1
            pixels = torch.randn(1, 16, values, generator=gen, dtype=torch.float64).to(dtype)
            return {
                "pixel_values": pixels,
                "pixel_attention_mask": mask,
                "spatial_shapes": torch.tensor([[3, 4]]),
            }
        pixels = torch.randn(1, *image_shape(model), generator=gen, dtype=torch.float64)
        return {model.main_input_name: pixels.to(dtype)}
    cfg = model.config
    vocab = model.get_input_embeddings().num_embeddings
    specials = {
        v
        for n in _TOKENS
        for v in ([getattr(cfg, n, None)] if not isinstance(getattr(cfg, n, None), list) else getattr(cfg, n))
    }
    ids = [i for i in range(5, vocab) if i not in specials][:6]
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    if isinstance(eos, int):
        ids[-1] = eos
    inputs = {"input_ids": torch.tensor([ids])}
    if getattr(cfg, "is_encoder_decoder", False) and "Classification" not in type(model).__name__:
        start = getattr(cfg, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else cfg.pad_token_id
        inputs["decoder_input_ids"] = torch.tensor([[start, ids[0], ids[1]]])
    return inputs


def status(model_type: str, head: str, preset: str, tol: float = 1e-4) -> Status:
    try:
        model = build(model_type, head)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build small
        return Status(model_type, head, preset, "not built", f"{type(exc).__name__}: {str(exc)[:160]}")
    try:
        inputs = _inputs(model)
    except Exception as exc:  # noqa: BLE001
        return Status(
            model_type,
            head,
            preset,
            "not built",
            f"no input the zoo can make: {type(exc).__name__}: {str(exc)[:120]}",
        )
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**inputs)
    except Exception as exc:  # noqa: BLE001 - the tiny model does not run even without lxt_plus
        return Status(
            model_type,
            head,
            preset,
            "not built",
            f"forward fails unpatched: {type(exc).__name__}: {str(exc)[:120]}",
        )
    try:
        result = _explain(model, inputs, preset)
    except UnsupportedModelError as exc:
        return Status(model_type, head, preset, "refused", str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is a bug, recorded
        return Status(model_type, head, preset, "failed", f"{type(exc).__name__}: {str(exc)[:300]}")
    try:
        c = result.conservation
        logit = float(c["target_logit"])
        total = logit - float(c["absorbed"])
    except Exception as exc:  # noqa: BLE001 - a result that cannot be read is a bug too
        return Status(model_type, head, preset, "failed", f"conservation: {type(exc).__name__}: {exc}")
    if not math.isfinite(total):
        return Status(model_type, head, preset, "wrong", "relevance is not finite")
    if preset != "conservative-check":
        return Status(model_type, head, preset, "runs")
    if abs(logit) < 1e-4:  # a dead probe proves nothing
        return Status(model_type, head, preset, "not built", f"the tiny model's target logit is {logit:.1e}")
    err = abs(total - logit) / max(abs(logit), 1e-6)
    if err <= tol:
        return Status(model_type, head, preset, "conserves", error=err)
    return Status(model_type, head, preset, "wrong", f"relevance {total:.6g} vs logit {logit:.6g}", err)


def _explain(model: torch.nn.Module, inputs: dict[str, torch.Tensor], preset: str) -> Any:
    """``lxt_plus.explain`` of the zoo's input as a user passes it: an image, text with an image,
    or token ids (with an encoder-decoder's prefix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "input_ids" not in inputs or "pixel_values" in inputs:  # an image, or text and an image
            return lxt_plus.explain(model, _main_input(inputs), rules=preset)
        return lxt_plus.explain(
            model, inputs["input_ids"], rules=preset, decoder_input_ids=inputs.get("decoder_input_ids")
        )


def _attn_implementations(model: torch.nn.Module) -> set[str]:
    """The attention implementation of the model's config and of each of its sub-configs."""
    configs = [model.config] + [
        getattr(model.config, n) for n in ("text_config", "vision_config") if getattr(model.config, n, None)
    ]
    return {c._attn_implementation for c in configs if getattr(c, "_attn_implementation", None)}


def attention_status(model_type: str, head: str, preset: str = "attnlrp", tol: float = 1e-4) -> Status:
    """The same weights and input under SDPA, then under eager attention: the same relevance (on
    tokens and pixels) to ``tol`` of its largest value, or why the two cannot be compared."""
    try:
        model = build(model_type, head)
        inputs = _inputs(model)
    except Exception as exc:  # noqa: BLE001
        return Status(model_type, head, preset, "not built", f"{type(exc).__name__}: {str(exc)[:160]}")
    if _attn_implementations(model) != {"sdpa"}:
        return Status(model_type, head, preset, "not built", f"not SDPA: {_attn_implementations(model)}")
    got, outputs = [], []
    for impl in ("sdpa", "eager"):
        try:
            if impl == "eager":
                model.set_attn_implementation("eager")
                if _attn_implementations(model) != {"eager"}:  # a switch that did not take
                    return Status(model_type, head, preset, "not built", "eager attention did not take")
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outputs.append(model(**inputs)[0].double())
        except Exception as exc:  # noqa: BLE001 - the tiny model does not run even without lxt_plus
            return Status(
                model_type, head, preset, "not built", f"{impl} forward fails unpatched: {exc!s:.100}"
            )
        try:
            result = _explain(model, inputs, preset)
        except UnsupportedModelError as exc:
            return Status(model_type, head, preset, "refused", f"{impl}: {exc}")
        except Exception as exc:  # noqa: BLE001 - anything else is a bug, recorded
            return Status(
                model_type, head, preset, "failed", f"{impl}: {type(exc).__name__}: {str(exc)[:300]}"
            )
        parts = [result.batch_relevance.flatten()]
        if result.image_relevance is not None and result.modality == "tokens":
            parts.append(result.image_relevance.flatten())
        got.append(torch.cat([t.double() for t in parts]))
    if not torch.allclose(outputs[0], outputs[1], rtol=tol, atol=tol * float(outputs[0].abs().max())):
        # the model itself computes another function under eager (PaliGemma's prefix mask)
        return Status(model_type, head, preset, "not built", "eager and SDPA outputs differ without lxt_plus")
    scale = float(got[0].abs().max())
    diff = float((got[0] - got[1]).abs().max())
    if diff <= tol * scale + 1e-12:
        return Status(model_type, head, preset, "same", error=diff / max(scale, 1e-12))
    return Status(
        model_type, head, preset, "wrong", f"eager differs from SDPA by {diff:.2e} (largest {scale:.2e})"
    )


def batch_status(
    model_type: str, head: str, side: str = "right", preset: str = "conservative-check", tol: float = 1e-4
) -> Status:
    """Two texts in one batch padded on ``side``: each row conserves, and each row's relevance
    equals the unpadded text explained alone, unless the model reads its padding (lxt_plus warned
    that relevance lands on it, or the padded row's logit is another one): then conservation alone,
    with the padding's share reported."""
    try:
        model = build(model_type, head)
        inputs = _inputs(model)
    except Exception as exc:  # noqa: BLE001
        return Status(model_type, head, preset, "not built", f"{type(exc).__name__}: {str(exc)[:160]}")
    if set(inputs) != {"input_ids"}:  # images and decoder prefixes are batched elsewhere
        return Status(model_type, head, preset, "not built", "not a plain text input")
    ids = inputs["input_ids"][0].tolist()
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    short = [ids[1], ids[2], ids[3], ids[-1]]
    batch = torch.tensor([ids, short + [pad, pad] if side == "right" else [pad, pad] + short])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0] if side == "right" else [0, 0, 1, 1, 1, 1]])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=batch, attention_mask=mask)
    except Exception as exc:  # noqa: BLE001 - the model does not take this batch even unpatched
        return Status(model_type, head, preset, "not built", f"forward fails unpatched: {type(exc).__name__}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = lxt_plus.explain(model, batch, attention_mask=mask, rules=preset)
            singles = [
                lxt_plus.explain(model, row[m.bool()], rules=preset)
                for row, m in zip(batch, mask, strict=True)
            ]
    except UnsupportedModelError as exc:
        return Status(model_type, head, preset, "refused", str(exc))
    except Exception as exc:  # noqa: BLE001 - anything else is a bug, recorded
        return Status(model_type, head, preset, "failed", f"{type(exc).__name__}: {str(exc)[:300]}")
    # a model that reads its padding (FNet's Fourier mixing): the padded row is another input
    reads_padding = any("padding tokens influence" in str(w.message) for w in caught) or any(
        abs(float(single.target_logit[0]) - float(result.target_logit[r]))
        > tol * abs(float(single.target_logit[0])) + 1e-7
        for r, single in enumerate(singles)
    )
    c = result.conservation
    logit = torch.as_tensor(c["target_logit"], dtype=torch.float64)
    err = float(
        (torch.as_tensor(c["absorbed"], dtype=torch.float64).abs() / logit.abs().clamp_min(1e-6)).max()
    )
    if err > tol:
        return Status(
            model_type, head, preset, "wrong", f"a row of the batch misses its logit by {err:.1e}", err
        )
    if not reads_padding:
        for r, (single, m) in enumerate(zip(singles, mask, strict=True)):
            got = result.batch_relevance[r][m.bool()].double()
            want = single.relevance.double()
            scale = float(want.abs().sum()) + abs(float(single.conservation["target_logit"]))
            diff = float((got - want).abs().max())
            if diff > tol * scale:
                return Status(
                    model_type,
                    head,
                    preset,
                    "wrong",
                    f"row {r} differs from its text alone by {diff:.1e}",
                    diff,
                )
    return Status(model_type, head, preset, "conserves", "reads its padding" if reads_padding else "", err)


def _main_input(inputs: dict[str, torch.Tensor]) -> Any:
    """What a user hands lxt_plus: the ids alone, the pixels alone, or the whole dict (ids with
    images or a decoder prefix)."""
    if "input_ids" not in inputs:  # the pixels (SigLIP2's patch lists: with their grid)
        return next(iter(inputs.values())) if len(inputs) == 1 else inputs
    return inputs["input_ids"] if set(inputs) == {"input_ids"} else inputs


def audit_ok(model_type: str, head: str) -> bool | str:
    """``lxt_plus.audit`` of the tiny model under ``conservative-check`` on the zoo's input: its
    verdict, or "refused" when the plan is refused outright (a module no rule can see into)."""
    model = build(model_type, head)
    inputs = _inputs(model)
    given = _main_input(inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():  # as in status(): BigBird picks its attention on the first call
                model(**inputs)
            return lxt_plus.audit(model, "conservative-check", inputs=given).ok
    except UnsupportedModelError:
        return "refused"


def layers_status(model_type: str, head: str, tol: float = 1e-3) -> Status:
    """``capture="layers"`` under ``conservative-check``: every row (the residual stream after each
    layer) sums to the target logit, or lxt_plus says why it cannot capture layers. Models that add
    image features into the stream after its first layer (Qwen3-VL's deepstack) are checked on the
    last row only. Encoder-decoders are not judged here (the encoder's rows carry only its share)."""
    from lxt_plus.errors import LxtPlusError

    preset = "conservative-check"
    try:
        model = build(model_type, head)
        inputs = _inputs(model)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(**inputs)
    except Exception as exc:  # noqa: BLE001
        return Status(model_type, head, preset, "not built", f"{type(exc).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        return Status(model_type, head, preset, "not built", "an encoder-decoder")
    given = _main_input(inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = lxt_plus.explain(model, given, rules=preset, capture="layers")
    except LxtPlusError as exc:  # refused, or a capture lxt_plus says it cannot make
        return Status(model_type, head, preset, "refused", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - anything else is a bug, recorded
        return Status(model_type, head, preset, "failed", f"{type(exc).__name__}: {str(exc)[:300]}")
    rows = result.captures["layers"][0]
    sums = rows.reshape(rows.shape[0], -1).double().sum(-1)
    vision = getattr(model.config, "vision_config", None)
    if getattr(vision, "deepstack_visual_indexes", None):
        sums = sums[-1:]
    logit = float(result.target_logit[0])
    err = float((sums - logit).abs().max()) / max(abs(logit), 1e-6)
    if err > tol:
        return Status(
            model_type, head, preset, "wrong", f"layer rows sum to {sums.tolist()}, logit {logit}", err
        )
    return Status(model_type, head, preset, "conserves", error=err)
