"""Properties over random small models and inputs: restored model, finite relevance, conservation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402

FAMILIES = ["llama", "gpt2", "qwen2", "gemma2", "opt", "bert"]
LAYER_KEY = {"gpt2": "n_layer"}


@st.composite
def cases(draw: Any) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny random model (family, 1-2 layers, seed) and a right-padded batch of 1-2 rows of 2-8 tokens."""
    family = draw(st.sampled_from(FAMILIES))
    layers = draw(st.integers(1, 2))
    model = build(
        family, seed=draw(st.integers(0, 2**16)), **{LAYER_KEY.get(family, "num_hidden_layers"): layers}
    )
    seq = draw(st.integers(2, 8))
    lengths = draw(st.lists(st.integers(2, seq), min_size=1, max_size=2))
    lengths[0] = seq
    ids = torch.tensor([draw(st.lists(st.integers(2, 95), min_size=seq, max_size=seq)) for _ in lengths])
    mask = torch.tensor([[1] * n + [0] * (seq - n) for n in lengths])
    return model, ids * mask, mask


def state(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[Any]]:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    flags = [m.training for m in model.modules()] + [p.requires_grad for p in model.parameters()]
    return out, flags


@settings(max_examples=15, deadline=None)
@given(cases(), st.sampled_from(["attnlrp", "ah-lrp", "gradient"]))
def test_model_restored_and_relevance_finite(
    case: tuple[nn.Module, torch.Tensor, torch.Tensor], rules: str
) -> None:
    model, ids, mask = case
    logits, flags = state(model, ids, mask)
    exp = explain(model, ids, attention_mask=mask, rules=rules)
    assert torch.isfinite(exp.relevance).all()
    assert (exp.relevance[mask == 0] == 0).all()
    after, flags_after = state(model, ids, mask)
    assert torch.equal(after, logits) and flags_after == flags and not is_patched(model)
    assert all(p.grad is None for p in model.parameters())


@settings(max_examples=15, deadline=None)
@given(cases())
def test_conservation_under_conservative_check(case: tuple[nn.Module, torch.Tensor, torch.Tensor]) -> None:
    """Biases zeroed, attention weights constant: input (+ position-embedding) relevance is the logit."""
    model, ids, mask = case
    logits, flags = state(model, ids, mask)
    exp = explain(model, ids, attention_mask=mask, rules="conservative-check")
    assert torch.isfinite(exp.relevance).all()
    total = exp.relevance.sum(-1) + (exp.extra_relevance if exp.extra_relevance is not None else 0.0)
    target = exp.target_logit
    # relative 1e-4; the small absolute floor covers float32 round-off on logits close to 0
    assert ((total - target).abs() <= 1e-4 * target.abs() + 1e-5).all(), (total, target)
    after, flags_after = state(model, ids, mask)
    assert torch.equal(after, logits) and flags_after == flags and not is_patched(model)
