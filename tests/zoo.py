"""The architecture zoo: a tiny random config of every text model class transformers exports.

For each model type of the auto mappings (CausalLM, SequenceClassification, Seq2SeqLM, MaskedLM)
:func:`tiny_config` shrinks the default config generically (sizes, layer counts, experts, per-layer
lists), :func:`build` makes the model, and :func:`status` runs it under a preset:

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
from lxt_plus.errors import UnsupportedModelError

HEADS = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "seqcls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
}
VOCAB = 128
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


def build(model_type: str, head: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tiny_config(model_type)
    auto = getattr(tf, HEADS[head][1])
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):  # count first: a size the shrinking missed must not fill memory
            size = sum(p.numel() for p in auto.from_config(cfg).parameters())
        if size > MAX_PARAMETERS:
            raise ValueError(f"{size:,} parameters after shrinking (a size attribute the zoo does not know)")
        model = auto.from_config(cfg)
    return model.eval()


@dataclass
class Status:
    model_type: str
    head: str
    preset: str
    status: str  # conserves | runs | refused | wrong | failed | not built
    detail: str = ""
    error: float | None = None  # relative conservation error (conservative-check)


def _inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
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
        return Status(model_type, head, preset, "not built", f"no token embeddings: {type(exc).__name__}")
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = lxt_plus.explain(
                model, inputs["input_ids"], rules=preset, decoder_input_ids=inputs.get("decoder_input_ids")
            )
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
    err = abs(total - logit) / max(abs(logit), 1e-6)
    if err <= tol:
        return Status(model_type, head, preset, "conserves", error=err)
    return Status(model_type, head, preset, "wrong", f"relevance {total:.6g} vs logit {logit:.6g}", err)
