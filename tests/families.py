"""Tiny random configs of every supported family (no downloads)."""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf

COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    head_dim=8,
    pad_token_id=0,
    initializer_range=0.2,
)

# model_type -> extra config kwargs
DECODERS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2": {},
    "qwen2_moe": dict(
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
    ),
    "qwen3": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "gemma": {},
    "gemma2": dict(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=8),
    "gemma3_text": dict(sliding_window=8),
    "phi": dict(num_key_value_heads=4, partial_rotary_factor=0.5),
    "phi3": {},
    "olmo": {},
    "olmo2": {},
    "granite": {},
    "stablelm": {},
    "starcoder2": {},
    "falcon": dict(
        head_dim=None, num_kv_heads=4, new_decoder_architecture=False, multi_query=False, alibi=False
    ),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64),
    "gpt_neox": {},
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, n_inner=64),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, enable_bias=True),
}
ENCODERS: dict[str, dict[str, Any]] = {
    "bert": {},
    "roberta": dict(pad_token_id=1),
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4),
    "electra": dict(embedding_size=32),
    "xlm-roberta": dict(pad_token_id=1),
    "modernbert": dict(global_attn_every_n_layers=2, local_attention=8),
}
NO_SEQCLS = {"gemma3_text", "olmo", "olmo2", "granite"}


def config(model_type: str, **overrides: Any) -> Any:
    extra = {**DECODERS.get(model_type, {}), **ENCODERS.get(model_type, {})}
    kwargs = {**COMMON, **extra, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    cfg = tf.AutoConfig.for_model(model_type, **kwargs)
    cfg.num_labels = 3
    return cfg


def build(
    model_type: str,
    head: str = "auto",
    seed: int = 0,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """A tiny random model in eval mode. ``head``: "causal-lm", "seqcls" or "auto".

    ``attn_implementation`` is given to ``from_config``, the one route every family honours (Falcon
    ignores a later ``set_attn_implementation``), and checked: no family silently runs another one.
    """
    torch.manual_seed(seed)
    cfg = config(model_type, **overrides)
    if head == "auto":
        head = "causal-lm" if model_type in DECODERS else "seqcls"
    cls = tf.AutoModelForCausalLM if head == "causal-lm" else tf.AutoModelForSequenceClassification
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = cls.from_config(cfg, **kwargs)
    if attn_implementation is not None:
        actual = model.config._attn_implementation
        assert actual == attn_implementation, f"{model_type}: asked for {attn_implementation}, runs {actual}"
    return model.eval()


def tiny_vit(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = tf.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        initializer_range=0.2,
        **overrides,
    )
    return tf.ViTForImageClassification(cfg).eval()


ALL_TEXT = list(DECODERS) + list(ENCODERS)
SEQCLS = [f for f in DECODERS if f not in NO_SEQCLS]


WORDS = (
    "the a an of to in is was and or but not very good bad great awful wonderful terrible film movie "
    "story actor plot capital france paris lyon london berlin germany city country river sea king queen "
    "man woman boy girl dog cat house tree car road sun moon star red blue green big small old new happy "
    "sad love hate loved hated best worst fun boring slow fast long short funny dull brilliant witty "
    "gorgeous ugly nice kind cold warm dark light day night time year world life"
).split()


def tiny_tokenizer(vocab_size: int = 96) -> Any:
    """A word-level tokenizer built offline; ids fit a tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def randomize_biases_and_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every bias and every norm weight/bias a seeded random, non-zero value (in place).

    At init biases are 0 and norm weights 1 (Gemma's ``1 + w`` norms: 0), so a test that only
    compares values could not see a bias left zeroed, or a norm weight left changed. Biases become
    ``±[0.1, 0.5]``; norm weights ``1 ± [0.1, 0.5]`` (``±[0.1, 0.5]`` where the init is 0).
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            is_norm = "norm" in type(module).__name__.lower()
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen or not (is_norm or name.endswith("bias")):
                    continue
                seen.add(id(p))
                magnitude = 0.1 + 0.4 * torch.rand(p.shape, generator=gen, dtype=torch.float64)
                sign = torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1
                offset = 1.0 if is_norm and not name.endswith("bias") and bool((p == 1).all()) else 0.0
                p.copy_((offset + sign * magnitude).to(p.dtype))
    assert seen, f"{type(model).__name__}: no bias and no norm parameter found"
    return model
