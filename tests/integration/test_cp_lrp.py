"""CP-LRP as LXT defines it, against relevance computed by hand with plain autograd.

LXT's CP-LRP (``lxt/efficient/patches.py``: ``cp_wrap_attention_forward``, ``cp_gated_mlp_forward``)
holds three things constant: the attention weights (q and k detached), the gate ``act(gate_proj(x))``
of a gated MLP, and (as for attention weights) MoE router weights; norms keep their scale constant.
The reference below does exactly that with forward hooks on the unpatched model, each written out
by module name, and reads ``inputs_embeds * grad`` after one plain backward pass. It shares no
code with lxt_plus's rules, so a wrong gate or a split product shows up as a mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lxt_plus

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"]


def detach_output(module: nn.Module, args: object, out: object) -> object:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(o.detach() if isinstance(o, Tensor) else o for o in out)
    return out


def norm_scale_constant(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """``y = x ⊙ (y / x)`` with the ratio a constant: the norm is linear in ``x`` (Ali et al. 2022)."""
    x = args[0]
    return x * (out / x).detach()


def by_hand(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(token relevance, target logit) with CP-LRP written out as hooks on the plain model."""
    hooks = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in ("q_proj", "k_proj", "act_fn", "gate", "shared_expert_gate"):
            # q, k: constant attention weights; act_fn: the gate act(gate_proj(x)) (dense MLPs and the
            # fused experts alike, where act_fn sees only the gate half); gate: MoE router weights
            hooks.append(module.register_forward_hook(detach_output))
        elif "RMSNorm" in type(module).__name__:
            hooks.append(module.register_forward_hook(norm_scale_constant))
    try:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, -1]
        target = logits.argmax(-1)
        picked = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(picked, embeds)
    finally:
        for h in hooks:
            h.remove()
    return (embeds.detach() * grad).sum(-1), logits.detach().gather(1, target[:, None])[:, 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_cp_lrp_equals_gates_and_attention_held_constant_by_hand(family: str) -> None:
    moe = family in ("mixtral", "qwen2_moe", "qwen3_moe")  # fused experts' grouped GEMM has no float64
    model = F.build(family) if moe else F.build(family).double()
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(4))
    expected, logit = by_hand(model, ids)
    res = lxt_plus.explain(model, ids, rules="cp-lrp")
    torch.testing.assert_close(res.target_logit.to(logit), logit, rtol=1e-6 if moe else 1e-12, atol=1e-12)
    # HF RMSNorms compute in float32 even in a float64 model, so both sides agree to float32 precision
    scale = float(expected.abs().max())
    got = res.batch_relevance.to(expected)
    torch.testing.assert_close(
        got, expected, rtol=1e-4 if moe else 1e-5, atol=(1e-5 if moe else 1e-6) * scale
    )
    assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.99999
    # the gated-product rule matters here: the uniform split (ah-lrp) gives other numbers
    uniform = lxt_plus.explain(model, ids, rules="ah-lrp").batch_relevance.to(expected)
    assert not torch.allclose(uniform, expected, rtol=1e-3, atol=1e-6)


def test_cp_lrp_preset_holds_gates_constant_and_ah_lrp_splits_them() -> None:
    cp, ah = lxt_plus.get_preset("cp-lrp"), lxt_plus.get_preset("ah-lrp")
    assert dict(cp.rules)["mlp"] == lxt_plus.engine.rules.ConstantGate()
    assert dict(ah.rules)["mlp"] == lxt_plus.engine.rules.UniformProduct()
    for preset in (cp, ah):
        assert dict(preset.rules)["attention"] == lxt_plus.engine.rules.AHLRP()
        assert dict(preset.rules)["router"] == lxt_plus.engine.rules.Constant()
