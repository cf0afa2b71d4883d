"""Quantized weights on CPU (torchao int8 weight-only): explain gives the relevance of the model the
quantized weights define (its dequantized twin) exactly, stays near the float model, conserves
under conservative-check, and patching leaves the quantized model as it was."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain, get_preset, patch  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

IDS = torch.tensor([[5, 9, 14, 3, 22, 41, 7, 8]])


def quantized_pair(family: str = "llama") -> tuple[nn.Module, nn.Module, nn.Module]:
    """(float model, its int8 weight-only copy, a float model holding the dequantized weights)."""
    model = build(family)
    quant = copy.deepcopy(model)
    quantize_(quant, Int8WeightOnlyConfig())
    twin = copy.deepcopy(model)
    for (_, m), (_, mq) in zip(twin.named_modules(), quant.named_modules(), strict=True):
        if isinstance(m, nn.Linear):
            assert type(mq.weight) is not nn.Parameter  # really quantized
            m.weight.data = mq.weight.dequantize().to(m.weight.dtype)
    return model, quant, twin


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp", "gamma", "zplus"])
def test_quantized_equals_its_dequantized_twin(rules: str) -> None:
    model, quant, twin = quantized_pair()
    preset = get_preset("attnlrp").override("linear", rules) if rules in ("gamma", "zplus") else rules
    got = explain(quant, IDS, rules=preset).relevance
    want = explain(twin, IDS, rules=preset).relevance
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # and within int8's rounding of the float model (about 3% of the largest value here)
    ref = explain(model, IDS, rules=preset).relevance
    assert float((got - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_quantized_conserves_and_patching_is_reversible() -> None:
    _, quant, _ = quantized_pair()
    exp = explain(quant, IDS, rules="conservative-check")
    assert abs(float(exp.conservation["absorbed"][0])) < 1e-5 * abs(float(exp.target_logit[0]))
    with torch.no_grad():
        before = quant(IDS).logits
    handle = patch(quant, "attnlrp")
    handle.remove()
    with torch.no_grad():
        assert torch.equal(quant(IDS).logits, before)
    assert all(type(m.weight) is not nn.Parameter for m in quant.modules() if isinstance(m, nn.Linear))


@pytest.mark.slow
def test_quantized_smollm2_matches_float() -> None:
    """The real model in int8: the same top tokens, relevance within 2% of the float model's."""
    from lxt_plus.demo import load_smollm2

    model, tok = load_smollm2()
    text = "The movie was a delight from start to finish, and the acting was"
    ref = explain(model, text, tokenizer=tok)
    quant = copy.deepcopy(model)
    quantize_(quant, Int8WeightOnlyConfig())
    got = explain(quant, text, tokenizer=tok, target=ref.target.ids[0])  # type: ignore[union-attr]
    a, b = ref.relevance.reshape(-1), got.relevance.reshape(-1)
    assert float((a - b).abs().max()) < 0.02 * float(a.abs().max())
    assert [t for t, _ in got.top_tokens(3)] == [t for t, _ in ref.top_tokens(3)]
