"""Encoder-decoder models (BART, T5): explain a generated token with relevance on the encoder's input
tokens and on the decoder prefix, through self-attention and cross-attention.

BART is checked against an independent float64 re-implementation (post-LN encoder and decoder,
learned positions, cross-attention, tied LM head with ``final_logits_bias``) built on the
reference tape of test_reference_lrp.py; T5 (relative position bias, RMSNorm, no biases) by
conservation with biases zeroed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import families  # noqa: E402
import zoo  # noqa: E402
from test_reference_lrp import (  # noqa: E402
    DTYPE,
    Node,
    Tape,
    bias_of,
    gelu_erf,
    merge_heads,
    split_heads,
    weight_of,
)

import lxt_plus  # noqa: E402
from lxt_plus.errors import InputError, TargetError  # noqa: E402

SOURCE = torch.tensor([[5, 17, 9, 33, 2]])
PREFIX = torch.tensor([[2, 40, 11]])


def _bart_attention(tape: Tape, attn: nn.Module, x: Node, kv: Node, allowed: Tensor, zero_bias: bool) -> Node:
    heads = attn.num_heads
    dh = attn.head_dim
    n, m = x.value.shape[0], kv.value.shape[0]
    q = tape.rearrange(
        tape.linear(x, weight_of(attn.q_proj).T, bias_of(attn.q_proj, zero_bias)), split_heads(n, heads, dh)
    )
    k = tape.rearrange(
        tape.linear(kv, weight_of(attn.k_proj).T, bias_of(attn.k_proj, zero_bias)), split_heads(m, heads, dh)
    )
    v = tape.rearrange(
        tape.linear(kv, weight_of(attn.v_proj).T, bias_of(attn.v_proj, zero_bias)), split_heads(m, heads, dh)
    )
    o = tape.rearrange(tape.attention(q, k, v, allowed, dh**-0.5), merge_heads)
    return tape.linear(o, weight_of(attn.out_proj).T, bias_of(attn.out_proj, zero_bias))


def _ln(tape: Tape, norm: nn.Module, x: Node, zero_bias: bool) -> Node:
    return tape.layer_norm(x, weight_of(norm), bias_of(norm, zero_bias), norm.eps)


def _ffn(tape: Tape, layer: nn.Module, x: Node, zero_bias: bool) -> Node:
    f = tape.activation(tape.linear(x, weight_of(layer.fc1).T, bias_of(layer.fc1, zero_bias)), gelu_erf)
    return tape.linear(f, weight_of(layer.fc2).T, bias_of(layer.fc2, zero_bias))


def bart_reference(
    model: nn.Module, src: Tensor, dec: Tensor, rules: str
) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(encoder token relevance, decoder prefix relevance, position relevance, target logit)``."""
    zero_bias = rules == "conservative-check"
    tape = Tape("ah-lrp" if rules in ("ah-lrp", "conservative-check") else "attnlrp", hf_float32=False)
    core = model.model
    enc, dcd = core.encoder, core.decoder
    n, m = src.shape[0], dec.shape[0]
    tokens = tape.leaf(weight_of(core.shared)[src])
    prefix = tape.leaf(weight_of(core.shared)[dec])
    enc_pos = tape.leaf(weight_of(enc.embed_positions)[torch.arange(n) + 2])
    dec_pos = tape.leaf(weight_of(dcd.embed_positions)[torch.arange(m) + 2])
    h = _ln(tape, enc.layernorm_embedding, tape.add(tokens, enc_pos), zero_bias)
    every = torch.ones(n, n, dtype=torch.bool)
    for layer in enc.layers:
        h = _ln(
            tape,
            layer.self_attn_layer_norm,
            tape.add(h, _bart_attention(tape, layer.self_attn, h, h, every, zero_bias)),
            zero_bias,
        )
        h = _ln(tape, layer.final_layer_norm, tape.add(h, _ffn(tape, layer, h, zero_bias)), zero_bias)
    memory = h
    g = _ln(tape, dcd.layernorm_embedding, tape.add(prefix, dec_pos), zero_bias)
    causal = torch.tril(torch.ones(m, m, dtype=torch.bool))
    cross = torch.ones(m, n, dtype=torch.bool)
    for layer in dcd.layers:
        g = _ln(
            tape,
            layer.self_attn_layer_norm,
            tape.add(g, _bart_attention(tape, layer.self_attn, g, g, causal, zero_bias)),
            zero_bias,
        )
        g = _ln(
            tape,
            layer.encoder_attn_layer_norm,
            tape.add(g, _bart_attention(tape, layer.encoder_attn, g, memory, cross, zero_bias)),
            zero_bias,
        )
        g = _ln(tape, layer.final_layer_norm, tape.add(g, _ffn(tape, layer, g, zero_bias)), zero_bias)
    last = tape.rearrange(g, lambda t: t[m - 1 : m])
    final_bias = None if zero_bias else model.final_logits_bias.detach().to(DTYPE)[0]
    logits = tape.linear(last, weight_of(model.lm_head).T, final_bias)
    token = int(logits.value[0].argmax())
    target = tape.rearrange(logits, lambda t: t[0, token])
    tape.propagate(target)

    def rel(node: Node) -> Tensor:
        return (
            torch.zeros(node.value.shape[0], dtype=DTYPE)
            if node.relevance is None
            else node.relevance.sum(-1)
        )

    positions = rel(enc_pos).sum() + rel(dec_pos).sum()
    return rel(tokens), rel(prefix), positions, float(target.value)


@pytest.fixture(scope="module")
def bart() -> nn.Module:
    return families.randomize_biases_and_norms(zoo.build("bart", "seq2seq")).to(DTYPE)


@pytest.mark.parametrize("rules", ["ah-lrp", "attnlrp", "conservative-check"])
def test_bart_equals_the_float64_reference(bart: nn.Module, rules: str) -> None:
    got = lxt_plus.explain(bart, SOURCE, rules=rules, decoder_input_ids=PREFIX)
    tokens, prefix, positions, logit = bart_reference(bart, SOURCE[0], PREFIX[0], rules)
    assert abs(float(got.target_logit) - logit) < 1e-10
    scale = float(torch.cat([tokens, prefix]).abs().max())
    torch.testing.assert_close(got.relevance[0], tokens, rtol=0, atol=1e-9 * scale)
    assert got.decoder_relevance is not None and got.decoder_ids is not None
    torch.testing.assert_close(got.decoder_relevance[0], prefix, rtol=0, atol=1e-9 * scale)
    assert torch.equal(got.decoder_ids, PREFIX)
    assert got.extra_relevance is not None
    torch.testing.assert_close(got.extra_relevance[0], positions, rtol=0, atol=1e-9 * scale)
    if rules == "conservative-check":
        c = got.conservation
        assert abs(float(c["absorbed"])) < 1e-9 * abs(logit)
        assert abs(float(c["decoder_relevance"])) > 0  # the prefix really counts in the sum


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_cross_attention_carries_relevance_and_conserves(model_type: str) -> None:
    model = families.randomize_biases_and_norms(zoo.build(model_type, "seq2seq"))
    got = lxt_plus.explain(model, SOURCE, rules="conservative-check", decoder_input_ids=PREFIX)
    c = got.conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))
    assert float(got.relevance.abs().sum()) > 1e-3 * abs(float(c["target_logit"]))  # the source matters
    # the default decoder prefix is the start token alone: the first generated token
    first = lxt_plus.explain(model, SOURCE, rules="ah-lrp")
    assert first.decoder_relevance is not None and first.decoder_relevance.shape == (1, 1)


def test_seq2seq_bad_input_fails_clearly() -> None:
    model = zoo.build("t5", "seq2seq")
    with pytest.raises(InputError, match="decoder_input_ids must be integer ids"):
        lxt_plus.explain(model, SOURCE, decoder_input_ids=torch.ones(1, 2))
    with pytest.raises(TargetError, match="decoder prefix of 3 tokens"):
        lxt_plus.explain(model, SOURCE, decoder_input_ids=PREFIX, position=5)
    with pytest.raises(InputError, match="for encoder-decoder models"):
        lxt_plus.explain(families.build("llama"), SOURCE, decoder_input_ids=PREFIX)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_generation_matrix_rows_equal_explain(model_type: str) -> None:
    """explain_generation on an encoder-decoder: one forward, batched backward passes; row t equals
    explain() of generated token t with the decoder prefix before it, source then prefix."""
    model = families.randomize_biases_and_norms(zoo.build(model_type, "seq2seq"))
    src = SOURCE[0]
    gen = lxt_plus.explain_generation(model, None, src, max_new_tokens=4, rules="attnlrp")
    n_s = src.numel()
    assert gen.prompt_length == n_s + 1 and torch.equal(gen.token_ids[:n_s], src)
    generated = gen.token_ids[n_s + 1 :]
    assert gen.matrix.shape == (generated.numel(), n_s + 1 + generated.numel())
    for t in range(generated.numel()):
        one = lxt_plus.explain(
            model,
            SOURCE,
            target=int(generated[t]),
            rules="attnlrp",
            decoder_input_ids=gen.token_ids[None, n_s : n_s + 1 + t],
        )
        row = gen.matrix[t]
        torch.testing.assert_close(row[:n_s], one.relevance[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(row[n_s : n_s + 1 + t], one.decoder_relevance[0], rtol=1e-4, atol=1e-5)
        assert float(row[n_s + 1 + t :].abs().sum()) == 0.0  # nothing at or after its own position
        torch.testing.assert_close(gen.target_logit[t], one.target_logit[0], rtol=1e-5, atol=1e-6)
