"""What the backward pass keeps: gated products share the activation's input, eager attention
weights are recomputed for long contexts, the probe's estimate scales to real inputs, and an input
that cannot fit is refused before it runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain, patch  # noqa: E402
from lxt_plus.engine import attention, memory  # noqa: E402
from lxt_plus.engine.functional import identity_rule, uniform_mul  # noqa: E402
from lxt_plus.engine.opcheck import SavedMemory, saved_memory  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402
from lxt_plus.errors import OutOfMemoryError  # noqa: E402


def graph(t: torch.Tensor) -> list[object]:
    """Every autograd node ``t`` depends on."""
    seen, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.append(node)
        stack.extend(f for f, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("act_first", [True, False])
def test_gated_product_keeps_two_activations_and_the_same_gradients(act_first: bool) -> None:
    """``silu(g) * u``: the product keeps ``g`` (which the identity rule keeps anyway) and ``u``,
    not ``silu(g)`` as a third; the gradients are the two rules' formulas, bit for bit."""
    torch.manual_seed(0)
    g0, u0 = torch.randn(7, 5), torch.randn(7, 5)
    g, u = (torch.nn.Linear(5, 5)(t).detach().requires_grad_(True) for t in (g0, u0))
    a = identity_rule(g, F.silu, ratio=torch.sigmoid)
    out = uniform_mul(a, u) if act_first else uniform_mul(u, a)
    assert torch.equal(out, F.silu(g) * u)
    kept = saved_memory(graph(out), set(), tokens=0)
    assert kept.per_token == 2 * g.numel() * g.element_size()
    grad = torch.randn(7, 5)
    dg, du = torch.autograd.grad(out, (g, u), grad)
    assert torch.equal(du, torch.addcmul(torch.zeros(()), grad, F.silu(g), value=0.5))
    assert torch.equal(dg, torch.addcmul(torch.zeros(()), grad, u, value=0.5) * torch.sigmoid(g))


def test_in_place_activation_keeps_its_ratio() -> None:
    """An activation that overwrites its input cannot keep the input: the ratio is kept instead."""
    x = torch.randn(4, 3).requires_grad_(True)
    y = x.clone()
    out = identity_rule(y, lambda t: t.relu_(), ratio=lambda t: (t > 0).to(t.dtype))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, (x > 0).to(x.dtype))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_probe_estimate_scales_to_a_real_input(implementation: str) -> None:
    """The patch probe's per-token figure, scaled to 40 tokens, is what a 40-token backward pass
    keeps (measured by walking its graph); eager attention's weights count per pair of tokens."""
    model = build("llama", attn_implementation=implementation).requires_grad_(False)
    handle = patch(model, "attnlrp")
    try:
        report = handle.plan.operations
        assert report is not None and report.memory is not None
        estimate = report.memory
        if implementation == "eager":
            assert estimate.per_kept_pair > 0 and estimate.per_pair == 0
        else:
            assert estimate.per_kept_pair == 0 == estimate.per_pair
        ids = torch.arange(40)[None] % model.config.vocab_size
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, logits_to_keep=1).logits.max()
        weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        kept = saved_memory(graph(logits), weights, tokens=40)
    finally:
        handle.remove()
    assert estimate.estimate(1, 40) == pytest.approx(kept.estimate(1, 40), rel=0.01)


def test_long_eager_attention_recomputes_its_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond ``KEEP_WEIGHTS_UP_TO`` keys eager attention's weights are not kept: the backward pass
    recomputes them per block, and the relevance is the same."""
    model = build("llama", attn_implementation="eager").requires_grad_(False)
    ids = torch.tensor([[5, 9, 14, 3, 22, 41, 7, 8, 30, 2]])
    kept = explain(model, ids).relevance
    monkeypatch.setattr(attention, "KEEP_WEIGHTS_UP_TO", 4)
    with patch(model, "attnlrp"):
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds).logits[0, -1].max()
        rule_nodes = [n for n in graph(out) if type(n).__name__ == "_RuleAttentionBackward"]
        assert rule_nodes and all(n.saved_tensors[3] is None for n in rule_nodes)  # type: ignore[attr-defined]
    torch.testing.assert_close(explain(model, ids).relevance, kept, rtol=0, atol=1e-6)


def test_estimate_counts_kept_weights_only_while_kept() -> None:
    m = SavedMemory(per_token=100.0, per_pair=0.0, per_kept_pair=10.0)
    short, long = attention.KEEP_WEIGHTS_UP_TO, attention.KEEP_WEIGHTS_UP_TO + 1
    assert m.estimate(2, short) == 2 * (100 * short + 10 * short * short)
    assert m.estimate(1, long) == 100 * long


def test_input_that_cannot_fit_is_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    """With too little memory free, explain refuses before the forward pass, gives the estimate and
    the option that fits (checkpointing), and leaves the model unpatched."""
    model = build("llama")
    ids = torch.arange(64)[None] % model.config.vocab_size
    handle = patch(model, "attnlrp")
    report = handle.plan.operations
    handle.remove()
    assert report is not None and report.memory is not None
    plain = report.memory.estimate(1, 64)
    ckpt = memory.checkpointed_bytes(report.memory, model.config, 1, 64, 4)
    assert ckpt is not None and ckpt < plain
    calls: list[int] = []
    model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    monkeypatch.setattr(memory, "available_bytes", lambda device: (plain + ckpt) // 2)
    with pytest.raises(OutOfMemoryError, match=r"1 × 64 tokens keeps at least .*checkpointing=True"):
        explain(model, ids)
    assert not calls and not is_patched(model)
    assert explain(model, ids, checkpointing=True).relevance.shape == (1, 64)  # fits that way
    monkeypatch.setattr(memory, "available_bytes", lambda device: ckpt // 2)
    with pytest.raises(OutOfMemoryError, match="at most about [0-9]+ tokens per row"):
        explain(model, ids, checkpointing=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # unknown: no refusal
    assert explain(model, ids).relevance.shape == (1, 64)


def test_available_memory_is_read() -> None:
    free = memory.available_bytes(torch.device("cpu"))
    assert free is not None and free > 2**20
    assert memory.available_bytes(torch.device("meta")) is None


@pytest.mark.parametrize("watch", ["retain_grad", "hook"])
def test_an_activation_whose_gradient_is_read_stays_in_the_graph(watch: str) -> None:
    """A gradient someone reads on ``silu(g)`` (``retain_grad``, a hook) must arrive: no fusion past it."""
    g = torch.randn(3, 4).requires_grad_(True)
    u = torch.randn(3, 4).requires_grad_(True)
    a = identity_rule(g * 1, F.silu, ratio=torch.sigmoid)
    seen: list[torch.Tensor] = []
    if watch == "retain_grad":
        a.retain_grad()
    else:
        a.register_hook(seen.append)
    out = uniform_mul(a, u)
    assert type(out.grad_fn).__name__ == "_UniformMulBackward"
    out.sum().backward()
    got = a.grad if watch == "retain_grad" else seen[0]
    assert got is not None and torch.equal(got, 0.5 * u.detach())
