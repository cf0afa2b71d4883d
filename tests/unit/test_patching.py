"""Patching is per instance and reversible, bit for bit."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.masking_utils import AttentionMaskInterface

import lxt_plus
from lxt_plus.engine.hf import ATTENTION_KEYS
from lxt_plus.engine.patching import handle_of, is_patched
from lxt_plus.engine.plan import PRESETS
from lxt_plus.errors import (
    AlreadyPatchedError,
    ConservationError,
    LxtPlusWarning,
    NotPatchedError,
    UnsupportedModelError,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, input-embedding gradient and weight gradients of a plain backward pass."""
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    out[..., -1, :].max().backward() if out.dim() == 3 else out.max().backward()
    weight_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), emb.grad.detach(), weight_grads


def assert_bit_identical(a, b) -> None:  # type: ignore[no-untyped-def]
    out_a, grad_a, w_a = a
    out_b, grad_b, w_b = b
    assert torch.equal(out_a, out_b)
    assert torch.equal(grad_a, grad_b)
    assert w_a.keys() == w_b.keys()
    for k in w_a:
        assert torch.equal(w_a[k], w_b[k]), k


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


REVERSIBLE_FAMILIES = ["llama", "gpt2", "bert", "falcon", "mixtral", "qwen2_moe", "gemma2"]
WITH_BIASES = dict(
    llama=dict(attention_bias=True, mlp_bias=True), falcon=dict(bias=True), gemma2=dict(attention_bias=True)
)  # Mixtral has no bias option


def random_model(family: str, seed: int) -> torch.nn.Module:
    return F.randomize_biases_and_norms(F.build(family, **WITH_BIASES.get(family, {})), seed=seed)


@pytest.mark.parametrize("family", REVERSIBLE_FAMILIES)
@pytest.mark.parametrize("rules", list(PRESETS))  # every preset, new ones included
def test_remove_restores_bit_identical(family: str, rules: str) -> None:
    """State, logits and plain gradients after patch + remove equal those before, bit for bit.

    Biases and norm weights are random and non-zero first: at init they are 0 and 1, and a
    ``remove()`` that left ``conservative-check``'s zeroed biases behind would go unseen."""
    model = random_model(family, seed=7)
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    state = snapshot(model)
    before = logits_and_grads(model, ids)
    handle = lxt_plus.patch(model, rules)
    during = logits_and_grads(model, ids)
    handle.remove()
    assert_same_state(state, snapshot(model))
    after = logits_and_grads(model, ids)
    assert_bit_identical(before, after)
    # the patch really changed the backward pass (this test cannot pass vacuously)
    if rules != "gradient":
        assert not torch.allclose(before[1], during[1])
    assert not is_patched(model)
    assert "forward" not in vars(model.get_input_embeddings())
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("family", [f for f in REVERSIBLE_FAMILIES if f != "mixtral"])
def test_conservative_check_zeroes_biases_only_while_patched(family: str) -> None:
    """The state the tests above compare does change under ``conservative-check``: every bias is 0
    while patched, nothing else changes, and ``remove()`` brings every bias back."""
    model = random_model(family, seed=8)
    state = snapshot(model)
    biases = {n for n, _ in model.named_parameters(remove_duplicate=False) if n.endswith("bias")}
    assert biases and all(bool((state[n] != 0).all()) for n in biases)
    with lxt_plus.patched(model, "conservative-check"):
        during = snapshot(model)
        assert during.keys() == state.keys()
        for name in state:
            if name in biases:
                assert torch.count_nonzero(during[name]) == 0, name
            else:
                assert torch.equal(during[name], state[name]), name
    assert_same_state(state, snapshot(model))


def test_nothing_outside_the_model_changes() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    registry_before = dict(transformers.AttentionInterface._global_mapping)
    masks_before = dict(AttentionMaskInterface._global_mapping)
    class_forwards = {
        cls: cls.forward
        for cls in (torch.nn.LayerNorm, torch.nn.Linear, torch.nn.Dropout, torch.nn.GELU, torch.nn.Embedding)
    }
    model = F.build("llama")
    with lxt_plus.patched(model, "attnlrp"):
        assert torch.nn.LayerNorm.forward is class_forwards[torch.nn.LayerNorm]
        attn_cls = type(model.model.layers[0].self_attn)
        assert "forward" not in vars(model.model.layers[0].self_attn)
        assert attn_cls.forward is attn_cls.__dict__["forward"]
        # while patched: existing registry entries are unchanged; only our own keys were added
        for key, fn in registry_before.items():
            if key not in ATTENTION_KEYS.values():
                assert transformers.AttentionInterface._global_mapping[key] is fn
                assert ALL_ATTENTION_FUNCTIONS[key] is fn
        for key, fn in masks_before.items():
            if key not in ATTENTION_KEYS.values():
                assert AttentionMaskInterface._global_mapping[key] is fn
        assert set(ATTENTION_KEYS.values()) <= set(transformers.AttentionInterface._global_mapping)
        assert set(ATTENTION_KEYS.values()) <= set(AttentionMaskInterface._global_mapping)
        added = set(transformers.AttentionInterface._global_mapping) - set(registry_before)
        assert added <= set(ATTENTION_KEYS.values())
    for cls, fwd in class_forwards.items():
        assert cls.forward is fwd
    # after: both registries are exactly as before, key for key and object for object
    assert_same_mapping(transformers.AttentionInterface._global_mapping, registry_before)
    assert_same_mapping(AttentionMaskInterface._global_mapping, masks_before)
    assert model.config._attn_implementation == "sdpa"


def assert_same_mapping(now: dict, before: dict) -> None:  # type: ignore[type-arg]
    assert now.keys() == before.keys()
    for key, fn in before.items():
        assert now[key] is fn, key


def test_registry_keys_leave_with_the_last_patched_model() -> None:
    """Our keys exist only while some model is patched; the last remove() takes them out."""
    registries = (transformers.AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
    before = [dict(r) for r in registries]
    assert not set(ATTENTION_KEYS.values()) & set(before[0])  # no patched model is left over
    a, b = F.build("llama"), F.build("gpt2")
    ha = lxt_plus.patch(a, "attnlrp")
    hb = lxt_plus.patch(b, "ah-lrp")
    ha.remove()
    assert set(ATTENTION_KEYS.values()) <= set(registries[0])  # b still dispatches through them
    ids = torch.randint(3, 90, (1, 5))
    assert torch.isfinite(lxt_plus.explain(b, ids[0], rules="ah-lrp").relevance).all()
    hb.remove()
    for now, then in zip(registries, before, strict=True):
        assert_same_mapping(now, then)


def test_an_existing_entry_under_our_key_is_restored() -> None:
    """Whatever stood under one of our names before (another library's entry) comes back on remove."""

    def theirs(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("never called while lxt_plus is patched")

    mapping = transformers.AttentionInterface._global_mapping
    mapping["lxt_plus_sdpa"] = theirs
    try:
        model = F.build("llama")
        with lxt_plus.patched(model, "attnlrp"):
            assert mapping["lxt_plus_sdpa"] is not theirs
            lxt_plus.explain(model, torch.randint(3, 90, (5,)), rules="attnlrp")
        assert mapping["lxt_plus_sdpa"] is theirs
    finally:
        mapping.pop("lxt_plus_sdpa", None)


def test_second_instance_untouched_even_with_shared_config() -> None:
    a = F.build("llama", seed=0)
    b = type(a)(a.config).eval()  # same class, same config object
    b.load_state_dict(a.state_dict())
    c = F.build("llama", seed=1)  # same class, own config
    ids = torch.randint(3, 90, (1, 7))
    ref_b, ref_c = logits_and_grads(b, ids), logits_and_grads(c, ids)
    with lxt_plus.patched(a, "attnlrp"):
        assert a.config._attn_implementation == "lxt_plus_sdpa"  # shared config switched ...
        assert_bit_identical(ref_b, logits_and_grads(b, ids))  # ... yet b falls back to sdpa exactly
        assert_bit_identical(ref_c, logits_and_grads(c, ids))
        rel_a = lxt_plus.explain(a, ids[0], rules="attnlrp").relevance
    assert a.config._attn_implementation == "sdpa"
    # b patched alone gives the same relevance as a (same weights)
    assert torch.allclose(lxt_plus.explain(b, ids[0], rules="attnlrp").relevance, rel_a, atol=1e-6)


def test_shared_config_restored_only_when_last_user_removes() -> None:
    a = F.build("llama")
    b = type(a)(a.config).eval()
    ha, hb = lxt_plus.patch(a, "ah-lrp"), lxt_plus.patch(b, "attnlrp")
    ha.remove()
    assert a.config._attn_implementation == "lxt_plus_sdpa"  # b still patched
    hb.remove()
    assert a.config._attn_implementation == "sdpa"


def test_context_manager_restores_when_body_raises() -> None:
    model = F.build("llama")
    ids = torch.randint(3, 90, (1, 5))
    before = logits_and_grads(model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with lxt_plus.patched(model, "attnlrp"):
            raise RuntimeError("boom")
    assert not is_patched(model)
    assert_bit_identical(before, logits_and_grads(model, ids))


def test_patching_twice_does_not_stack() -> None:
    model = F.build("llama")
    ids = torch.randint(3, 90, (1, 6))
    outer = lxt_plus.patch(model, "attnlrp")
    once = lxt_plus.explain(model, ids[0], rules="attnlrp").relevance
    inner = lxt_plus.patch(model, "attnlrp")
    assert inner.nested
    twice = lxt_plus.explain(model, ids[0], rules="attnlrp").relevance
    assert torch.equal(once, twice)
    inner.remove()
    assert is_patched(model)  # the inner level undoes only itself
    with pytest.raises(AlreadyPatchedError, match="already patched with preset 'attnlrp'"):
        lxt_plus.patch(model, "ah-lrp")
    outer.remove()
    assert not is_patched(model)
    with pytest.raises(NotPatchedError, match="already removed"):
        outer.remove()


def test_describe_lists_every_touched_module() -> None:
    model = F.build("qwen2_moe")
    with lxt_plus.patched(model, "ah-lrp") as handle:
        text = handle.describe()
    assert "model.layers.0.self_attn" in text and "ah-lrp()" in text and "[attention registry]" in text
    assert "model.layers.0.mlp.gate" in text and "constant()" in text
    assert "model.layers.0.mlp.shared_expert_gate" in text
    assert "model.norm" in text and "conservative-norm()" in text
    assert "act_fn" in text and "identity(" in text


class Mystery(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x) * self.scale


def test_unsupported_module_raises_before_touching() -> None:
    model = F.build("llama")
    model.model.layers[1].mlp.act_fn = Mystery()
    ids = torch.randint(3, 90, (1, 5))
    before = logits_and_grads(model, ids)
    with pytest.raises(
        UnsupportedModelError, match=r"exp in model\.layers\.1\.mlp\.act_fn \(Mystery; would fit"
    ):
        lxt_plus.patch(model, "attnlrp")
    assert not is_patched(model)
    assert_bit_identical(before, logits_and_grads(model, ids))
    with lxt_plus.patched(model, "attnlrp", strict=False) as handle:
        entry = next(e for e in handle.plan.entries if e.path == "model.layers.1.mlp.act_fn")
        assert entry.rule.name == "pass" and entry.role == "unknown"
    # an audit names it as the first module where relevance leaks
    report = lxt_plus.audit(model, lxt_plus.get_preset("ah-lrp").override("type:Mystery", "pass"))
    assert report.operations is not None and "exp" in [f.op for f in report.operations.unknown]
    assert "exp in model.layers.1.mlp.act_fn (Mystery" in str(report)
    assert report.first_leak is not None and report.first_leak.path == "model.layers.1.mlp.act_fn"
    assert "model.layers.1.mlp.act_fn (Mystery)" in str(report)
    with pytest.raises(ConservationError, match=r"exp in model\.layers\.1\.mlp\.act_fn \(Mystery"):
        report.raise_for_leak()
    model.model.layers[1].mlp.act_fn = torch.nn.SiLU()
    good = lxt_plus.audit(model, "ah-lrp")
    assert good.raise_for_leak() is good


def test_unrecognised_norm_is_refused_by_the_probe() -> None:
    class OddNorm(torch.nn.Module):  # normalises without any operation the rule can hold constant
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / x.abs().amax(-1, keepdim=True) * self.weight

    model = F.build("llama")
    model.model.norm = OddNorm()
    with pytest.raises(UnsupportedModelError, match=r"model\.norm \(OddNorm, norm\)"):
        lxt_plus.patch(model, "attnlrp")
    assert not is_patched(model)
    assert all("forward" not in vars(m) for m in model.modules())


def test_instance_forward_set_by_another_library_is_wrapped_and_restored() -> None:
    model = F.build("llama")
    mlp = model.model.layers[0].mlp
    calls = []
    original = mlp.forward

    def foreign(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(x)

    mlp.forward = foreign
    with lxt_plus.patched(model, "attnlrp"):
        lxt_plus.explain(model, torch.randint(3, 90, (5,)))
        assert calls
    assert mlp.forward is foreign


def test_plain_torch_model_features() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    x = torch.randn(4, 6)
    res = lxt_plus.explain(net, x, target=1, rules="conservative-check")
    assert res.relevance.shape == (4, 6)
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.bias.zero_()
        logit = net(x)[:, 1]
    torch.testing.assert_close(res.relevance.sum(-1), logit, rtol=1e-5, atol=1e-6)
    assert res.modality == "features"


class _InlineMixer(torch.nn.Module):
    """A plain module whose forward computes attention and a gated product inline."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mixed = torch.softmax(h @ h.transpose(-1, -2), -1) @ h
        return self.head((torch.tanh(self.proj(mixed)) * h).mean(1))


def test_plain_module_operations_are_checked_on_the_explained_input() -> None:
    """The patch-time probe cannot build an input for a plain module; explain checks its operations
    on the input it was given, so an inline softmax is refused by name, not passed as a gradient."""
    torch.manual_seed(0)
    net, x = _InlineMixer().eval(), torch.randn(2, 5, 8)
    with pytest.raises(UnsupportedModelError, match="softmax") as info:
        lxt_plus.explain(net, x, target=1)
    assert "tanh" in str(info.value) and "mul of two input-dependent" in str(info.value)
    assert handle_of(net) is None  # refused before any relevance, and unpatched
    with pytest.warns(LxtPlusWarning, match="NOT conservative"):
        res = lxt_plus.explain(net, x, target=1, strict=False)
    assert res.relevance.shape == x.shape
    # a plain module the rules cover is checked too, and passes
    seq = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LxtPlusWarning)
        lxt_plus.explain(seq, torch.randn(4, 6), target=1)
    with lxt_plus.patched(seq) as handle:
        assert handle.plan.operations is not None and handle.plan.operations.ok


@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_attention_that_bypasses_the_registry_is_rerouted_to_inline_rules(rules: str) -> None:
    """A class that claims registry support but computes attention itself: the probe forward sees
    no registry call, so the rule moves to the module's inline operations, with the same relevance."""
    from transformers.models.llama import modeling_llama as ml

    ref, model = F.build("llama"), F.build("llama")
    for m in (ref, model):
        m.set_attn_implementation("eager")
    attn = model.model.layers[0].self_attn

    def inline_forward(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q, k, v = (
            p(hidden_states).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
        out, weights = ml.eager_attention_forward(attn, q, k, v, attention_mask, scaling=attn.scaling)
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1)), weights

    attn.forward = inline_forward
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    with lxt_plus.patched(model, rules=rules) as handle:
        routes = {e.path: e.route for e in handle.plan.entries if e.role == "attention"}
    assert routes["model.layers.0.self_attn"] == "ops" and routes["model.layers.1.self_attn"] == "registry"
    expected = lxt_plus.explain(ref, ids, rules=rules).relevance
    torch.testing.assert_close(lxt_plus.explain(model, ids, rules=rules).relevance, expected)
    assert attn.forward is inline_forward  # restored after explain


def test_remove_undoes_everything_then_reports_every_failure() -> None:
    model = F.randomize_biases_and_norms(F.build("llama"))
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        before = model(ids).logits
    handle = lxt_plus.patch(model, "conservative-check")

    def fail(exc: Exception) -> Any:
        def step() -> None:
            raise exc

        return step

    handle._undo[:0] = [fail(RuntimeError("first")), fail(ValueError("second"))]  # run last
    with pytest.raises(ExceptionGroup) as info:
        handle.remove()
    assert [type(e) for e in info.value.exceptions] == [ValueError, RuntimeError]
    assert not is_patched(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before), "the other undo steps did not all run"
