"""The attention rules' own backward pass (lxt_plus/attention.py) against autograd.

The rule gradient is autograd's attention gradient times the rule's factors (AttnLRP: q, k ×¼ and
v ×½; AH-LRP: v only). These tests compare the blocked backward pass with autograd through
``scaled_dot_product_attention`` in float64, for every mask form, grouped-query attention and
blocks small enough that the causal key limit and fully masked rows are exercised.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lxt_plus
import lxt_plus.engine.attention as attention
from lxt_plus.engine.attention import AttentionSpec, probs_match, rule_attention, rule_sdpa, sdpa_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import ALL_TEXT, build  # noqa: E402

L, S, HQ, D = 40, 40, 4, 8


def _mask(kind: str, gen: torch.Generator) -> Any:
    if kind == "none" or kind == "causal":
        return None
    if kind == "tril":
        return torch.ones(L, S, dtype=torch.bool).tril()[None, None]
    if kind == "bool":
        m = torch.rand(2, 1, L, S, generator=gen) > 0.4
        m[1, :, 5] = False  # a fully masked query row
        return m
    if kind == "padding":  # (batch, 1, 1, keys): one query dim broadcast over all rows
        m = torch.ones(2, 1, 1, S, dtype=torch.bool)
        m[0, ..., :7] = False
        return m
    if kind == "float":
        m = torch.zeros(2, 1, L, S, dtype=torch.float64)
        m.masked_fill_(torch.rand(2, 1, L, S, generator=gen) > 0.6, torch.finfo(torch.float64).min)
        m[..., 0] = 0.0
        m = m + torch.rand(2, 1, L, S, generator=gen)  # plus a finite bias (ALiBi-like)
        m[1, :, 3] = float("-inf")  # a row no key may reach
        m[1, :, 4, 1:] = float("-inf")
        return m
    raise AssertionError(kind)


@pytest.mark.parametrize("route", ["rule_sdpa", "own", "blocked"])
@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("hk", [HQ, 2])
@pytest.mark.parametrize("detach", [False, True], ids=["attnlrp", "ah-lrp"])
@pytest.mark.parametrize("kind", ["none", "causal", "tril", "bool", "padding", "float"])
def test_rule_gradient_is_autograd_times_the_rule_factors(
    kind: str, detach: bool, hk: int, blocks: str, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``rule_sdpa`` as patched models call it (AttnLRP: autograd through torch's kernel), as it
    runs under checkpointing (``own``: our backward for both rules), and our blocked backward
    called directly."""
    if route == "own":
        monkeypatch.setattr(attention, "own_backward", lambda q: True)
    if blocks == "many":  # 16-row blocks: several per sequence, each over its own key prefix
        monkeypatch.setattr(attention, "ROWS", 16)
    gen = torch.Generator().manual_seed(len(kind) * 10 + hk + detach)
    q = torch.randn(2, HQ, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, hk, S, D, generator=gen, dtype=torch.float64, requires_grad=True) for _ in "kv")
    kwargs = dict(attn_mask=_mask(kind, gen), is_causal=kind == "causal", scale=0.3, enable_gqa=hk != HQ)
    ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, **kwargs)
    if route in ("rule_sdpa", "own"):
        out, ours = rule_sdpa(F.scaled_dot_product_attention, (q, k, v), kwargs, detach)
        assert ours == (detach or route == "own")  # AH-LRP always ours; AttnLRP torch's kernel
    else:
        _, spec = sdpa_spec((q, k, v), kwargs, detach)
        assert spec is not None
        out = rule_attention(q, k, v, ref.detach(), spec)
    assert torch.equal(out, ref)  # the forward pass is torch's own kernel
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (v,) if detach else (q, k, v), grad, retain_graph=True)
    want = torch.autograd.grad(ref, ref_in, grad)
    factors = (None, None, 1.0) if detach else (0.25, 0.25, 0.5)
    for g, w, f in zip((None, None, *got) if detach else got, want, factors, strict=True):
        if f is not None:
            torch.testing.assert_close(g, f * w, rtol=1e-10, atol=1e-12)
    if detach:  # AH-LRP: the weights are constants, no gradient reaches q or k
        assert torch.autograd.grad(out, (q, k), grad, allow_unused=True) == (None, None)


@pytest.fixture
def block_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Blocks of 16 query rows; the list fills with the score elements each recomputed block reads."""
    monkeypatch.setattr(attention, "ROWS", 16)
    seen: list[int] = []
    real = attention._block_probs

    def spy(
        q: torch.Tensor,
        k: torch.Tensor,
        spec: AttentionSpec,
        r0: int,
        r1: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        seen.append((r1 - r0) * k.shape[-2])
        return real(q, k, spec, r0, r1, out)

    monkeypatch.setattr(attention, "_block_probs", spy)
    return seen


def test_causal_blocks_skip_keys_no_row_can_see(block_sizes: list[int]) -> None:
    """With causal masking, block r reads only its key prefix: fewer score elements than dense."""
    seen = block_sizes
    q, k, v = (torch.randn(1, 1, 64, 4, requires_grad=True) for _ in "qkv")
    out, _ = rule_sdpa(F.scaled_dot_product_attention, (q, k, v), {"is_causal": True}, True)
    out.sum().backward()
    assert len(seen) == 4 and sum(seen) == 16 * (16 + 32 + 48 + 64) < 64 * 64


def test_mask_tensor_blocks_skip_keys_no_row_can_see(block_sizes: list[int]) -> None:
    """A causal mask given as a tensor (boolean, or additive as eager attention gets it) limits each
    block to its key prefix too, and a padded key column no row sees is never read."""
    seen = block_sizes
    q, k, v = (torch.randn(2, 1, 64, 4, requires_grad=True) for _ in "qkv")
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    additive = torch.zeros(64, 64).masked_fill(~causal, torch.finfo(torch.float32).min)
    for mask in (causal, additive):
        seen.clear()
        out, ours = rule_sdpa(F.scaled_dot_product_attention, (q, k, v, mask[None, None]), {}, True)
        assert ours
        out.sum().backward()
        assert sum(seen) == 16 * (16 + 32 + 48 + 64) < 64 * 64
    seen.clear()
    visible = causal.clone()
    visible[:, 40:] = False
    visible[40:, :40] = True  # rows past the text see all of it (and no padding key)
    out, _ = rule_sdpa(F.scaled_dot_product_attention, (q, k, v, visible[None, None]), {}, True)
    out.sum().backward()
    assert sum(seen) == 16 * (16 + 32 + 40 + 40)


def test_rows_without_gradient_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "ROWS", 16)
    calls: list[int] = []
    real = attention._block_probs
    monkeypatch.setattr(attention, "_block_probs", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    q, k, v = (torch.randn(1, 1, 64, 4, requires_grad=True) for _ in "qkv")
    out, _ = rule_sdpa(F.scaled_dot_product_attention, (q, k, v), {"is_causal": True}, True)
    out[0, 0, -1].sum().backward()  # only the last query row receives a gradient
    assert calls == [48]


def test_mask_that_needs_a_gradient() -> None:
    """A mask computed from the input (Doge's dynamic mask): AttnLRP lets autograd through the
    kernel, so the mask receives its share of the scores' relevance; AH-LRP holds the weights,
    and so the mask, constant, and takes its own backward pass."""
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    ref_in = [t.detach().requires_grad_(True) for t in (q, k, v)]
    (w,) = torch.autograd.grad(F.scaled_dot_product_attention(*ref_in, bias.detach()).sum(), ref_in[2])
    out, ours = rule_sdpa(F.scaled_dot_product_attention, (q, k, v, bias), {}, False)
    assert not ours
    g_v, g_mask = torch.autograd.grad(out.sum(), (v, bias))
    assert g_mask.abs().sum() > 0
    torch.testing.assert_close(g_v, w * 0.5)  # AttnLRP's value factor
    out, ours = rule_sdpa(F.scaled_dot_product_attention, (q, k, v, bias), {}, True)
    assert ours
    g_v, g_mask = torch.autograd.grad(out.sum(), (v, bias), allow_unused=True)
    assert g_mask is None
    torch.testing.assert_close(g_v, w)


def test_given_weights_replace_the_recomputation() -> None:
    """The eager path hands over the model's own weights; the result equals the recomputed one."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    mask = torch.zeros(1, 1, 9, 9, dtype=torch.float64).masked_fill(
        torch.ones(9, 9, dtype=torch.bool).triu(1), torch.finfo(torch.float64).min
    )
    probs = torch.softmax(q @ k.transpose(-1, -2) * 0.5 + mask, -1).detach()
    out = (probs @ v).detach()
    assert probs_match(q, k, probs, mask, 0.5)
    assert not probs_match(q, k, probs, mask, 0.4)  # a wrong scale is caught
    capped = torch.softmax(torch.tanh(q @ k.transpose(-1, -2) * 0.5) * 3 + mask, -1).detach()
    assert not probs_match(q, k, capped, mask, 0.5)  # soft-capped scores are caught
    spec = AttentionSpec(scale=0.5, mask=mask, causal=False, qk_factor=0.25, v_factor=0.5)
    grad = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    given = torch.autograd.grad(rule_attention(q, k, v, out, spec, probs=probs), (q, k, v), grad)
    recomputed = torch.autograd.grad(rule_attention(q, k, v, out, spec), (q, k, v), grad)
    for a, b in zip(given, recomputed, strict=True):
        torch.testing.assert_close(a, b)


def _rule_attention_nodes(fn: Any) -> int:
    seen, stack, n = set(), [fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += f.name() == "_RuleAttentionBackward"
        stack += [g for g, _ in f.next_functions]
    return n


SOFTCAPPED = {"gemma2"}  # soft-capped scores: autograd with the identity rule on tanh


@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
@pytest.mark.parametrize(
    ("family", "impl"), [(f, i) for f in ALL_TEXT for i in ("eager", "sdpa") if (f, i) != ("gemma2", "sdpa")]
)  # soft-capping: eager only
def test_every_family_gets_the_blocked_backward(family: str, impl: str, rules: str) -> None:
    """Eager attention (both rules) and AH-LRP through SDPA use our backward in every layer.

    AttnLRP through SDPA keeps torch's fused backward without checkpointing (see ``rule_sdpa``)."""
    model = build(family, attn_implementation=impl)  # checked: Falcon ignores set_attn_implementation
    ids = torch.randint(3, 90, (1, 10))
    with lxt_plus.patched(model, rules=rules):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb).logits
    n = _rule_attention_nodes(logits.grad_fn)
    # a class that computes attention inline (Falcon) takes the inline-ops route: under "eager" its
    # matmul/softmax rules are autograd's; under "sdpa" it calls scaled_dot_product_attention, which
    # gets the SDPA rule (GPT-J computed inline before transformers 5.24; it uses the registry since)
    inline = not type(model)._can_set_attn_implementation()
    if family in SOFTCAPPED or (inline and impl == "eager") or (impl == "sdpa" and rules == "attnlrp"):
        assert n == 0
    else:
        assert n == model.config.num_hidden_layers


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("probs", [False, True], ids=["recomputed", "given"])
@pytest.mark.parametrize("detach", [False, True], ids=["attnlrp", "ah-lrp"])
def test_batched_upstream_gradients_match_one_pass_each(
    detach: bool, probs: bool, blocks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``autograd.grad(is_grads_batched=True)`` (generation matrices) gives the per-row results,
    in one block of query rows and in several (each over its own causal key prefix)."""
    if blocks == "many":
        monkeypatch.setattr(attention, "ROWS", 5)
    torch.manual_seed(1)
    q = torch.randn(1, 4, 12, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True) for _ in "kv")
    kwargs = {"is_causal": True, "enable_gqa": True}
    _, spec = sdpa_spec((q, k, v), kwargs, detach)
    assert spec is not None
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        weights = torch.softmax(
            (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * spec.scale).masked_fill(
                torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf")
            ),
            -1,
        )
    out = rule_attention(q, k, v, out, spec, probs=weights if probs else None)
    grads = torch.randn(3, *out.shape, dtype=torch.float64)
    wrt = (v,) if detach else (q, k, v)
    batched = torch.autograd.grad(out, wrt, grads, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(out, wrt, grads[i], retain_graph=True)
        for b, o in zip(batched, one, strict=True):
            torch.testing.assert_close(b[i], o)


@pytest.mark.parametrize("detach", [False, True], ids=["attnlrp", "ah-lrp"])
def test_checkpoint_recomputation_replays_the_attention_output(
    detach: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``checkpoint(context_fn=replay_contexts)`` the kernel runs once, in the forward pass;
    each recomputation (one per backward pass of a retained graph) gets the same output back, and
    the gradients equal those without checkpointing, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    from lxt_plus.engine.attention import replay_contexts

    calls: list[int] = []
    real = attention._attention_output

    def counted(compute, shape):  # type: ignore[no-untyped-def]
        return real(lambda: calls.append(1) or compute(), shape)

    monkeypatch.setattr(attention, "_attention_output", counted)
    monkeypatch.setattr(attention, "own_backward", lambda q: True)  # the reference: ours, unreplayed
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 12, 8, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 12, 8, generator=gen, requires_grad=True) for _ in "kv")
    wrt = (v,) if detach else (q, k, v)
    grads = [torch.randn(1, 4, 12, 8, generator=gen) for _ in range(2)]

    def layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kwargs = {"is_causal": True, "enable_gqa": True}
        first = rule_sdpa(F.scaled_dot_product_attention, (q, k, v), kwargs, detach)[0]
        second = rule_sdpa(F.scaled_dot_product_attention, (first.tanh(), k, v), kwargs, detach)[0]
        return second * 2

    plain = layer(q, k, v)
    want = [torch.autograd.grad(plain, wrt, g, retain_graph=True) for g in grads]
    calls.clear()
    out = checkpoint(layer, q, k, v, use_reentrant=False, context_fn=replay_contexts)
    assert torch.equal(out, plain) and len(calls) == 2  # two attention calls, run once each
    for g, w in zip(grads, want, strict=True):
        got = torch.autograd.grad(out, wrt, g, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(got, w, strict=True))
    assert len(calls) == 2, "a recomputation ran the attention kernel again"


def test_replay_recomputes_an_output_of_another_shape() -> None:
    """A recomputation whose calls come in another order than recorded (a shape mismatch) runs the
    kernel instead of handing back a wrong output."""
    from lxt_plus.engine.attention import replay_contexts

    record, replay = replay_contexts()
    with record:
        attention._attention_output(lambda: torch.zeros(2, 3), (2, 3))
    with replay:
        got = attention._attention_output(lambda: torch.ones(4), (4,))
        assert torch.equal(got, torch.ones(4))


def test_uniform_matmul_output_may_be_modified_in_place() -> None:
    """Falcon's eager attention divides its scores in place (``scores /= sqrt(d)``): the uniform
    ``q @ kᵀ`` result allows it, and the gradient is half the plain one through the same in-place op.
    A ``grad_scale`` of a tensor others may read stays a view, and an in-place change raises."""
    from lxt_plus.engine.functional import grad_scale, uniform_matmul

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=gen) for _ in "qk")
    weight = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=gen)

    def grads(matmul):  # type: ignore[no-untyped-def]
        a, b = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        scores = matmul(a, b.transpose(-1, -2))
        scores /= 2.0
        (weight * torch.softmax(scores, -1)).sum().backward()
        return a.grad, b.grad

    for got, plain in zip(grads(uniform_matmul), grads(torch.matmul), strict=True):
        torch.testing.assert_close(got, 0.5 * plain, rtol=1e-12, atol=1e-12)
    shared = grad_scale(q.clone().requires_grad_(True) * 1.0, 0.5)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        shared /= 2.0
