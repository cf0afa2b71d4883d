"""Long-context support: gradient checkpointing gives the same relevance and is undone; bf16 works."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402

FAMILIES = ["llama", "gpt2"]


def checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[5, 9, 14, 3, 22, 41, 7, 8], [11, 12, 13, 17, 2, 0, 0, 0]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_checkpointing_gives_identical_relevance(family: str, rules: str) -> None:
    model = build(family)
    ids, mask = batch()
    plain = explain(model, ids, attention_mask=mask, rules=rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ckpt = explain(model, ids, attention_mask=mask, rules=rules, checkpointing=True)
    torch.testing.assert_close(ckpt.relevance, plain.relevance, rtol=0, atol=1e-6)
    torch.testing.assert_close(ckpt.target_logit, plain.target_logit, rtol=0, atol=1e-6)
    assert not checkpointing_on(model) and not is_patched(model)
    assert flags(model) == [False] * len(flags(model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_checkpointing_runs_each_attention_kernel_once(
    family: str, rules: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layers' recomputation gets the attention outputs of the forward pass back: one kernel
    call per layer, and the relevance is that of explaining without checkpointing."""
    from lxt_plus.engine import attention

    calls: list[int] = []
    real = attention._attention_output

    def counted(compute, shape):  # type: ignore[no-untyped-def]
        return real(lambda: calls.append(1) or compute(), shape)

    monkeypatch.setattr(attention, "_attention_output", counted)
    model = build(family)
    ids, mask = batch()
    explain(model, ids, attention_mask=mask, rules=rules)  # the patch-time probe runs once per model
    calls.clear()
    plain = explain(model, ids, attention_mask=mask, rules=rules)
    # without checkpointing, AttnLRP keeps torch's fused backward (autograd through the kernel)
    assert len(calls) == (0 if rules == "attnlrp" else model.config.num_hidden_layers)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ckpt = explain(model, ids, attention_mask=mask, rules=rules, checkpointing=True)
    assert len(calls) == model.config.num_hidden_layers
    if rules == "ah-lrp":  # the same backward with and without checkpointing: the same bits
        assert torch.equal(ckpt.relevance, plain.relevance)
    else:  # AttnLRP: our backward against torch's fused one, the same gradient up to rounding
        torch.testing.assert_close(ckpt.relevance, plain.relevance, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_restores_mixed_train_flags_and_user_setting(family: str) -> None:
    model = build(family)
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.Dropout | nn.Embedding)).eval()
    before = flags(model)
    ids, mask = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        explain(model, ids, attention_mask=mask, checkpointing=True)
        assert flags(model) == before and not checkpointing_on(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        explain(model, ids, attention_mask=mask, checkpointing=True)
    assert checkpointing_on(model), "a user's own checkpointing setting must survive"
    assert flags(model) == before


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bfloat16_end_to_end(family: str, checkpointing: bool) -> None:
    model = build(family).to(torch.bfloat16)
    ids, mask = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exp = explain(model, ids, attention_mask=mask, checkpointing=checkpointing)
    assert exp.relevance.dtype == torch.float32
    assert torch.isfinite(exp.relevance).all() and exp.relevance.abs().sum() > 0
    assert (exp.relevance[1, 5:] == 0).all()
    reference = explain(build(family), ids, attention_mask=mask)  # same weights in float32
    assert torch.corrcoef(torch.stack([exp.relevance.flatten(), reference.relevance.flatten()]))[0, 1] > 0.9
    assert next(model.parameters()).dtype == torch.bfloat16


CPU_OOM = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 4718592 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.mark.parametrize("error", [RuntimeError(CPU_OOM), torch.OutOfMemoryError("CUDA out of memory.")])
def test_out_of_memory_suggests_checkpointing(error: Exception) -> None:
    from lxt_plus.errors import LxtPlusError

    model = build("llama")
    ids, mask = batch()

    def oom(module: nn.Module, args: object) -> None:  # what a context too long for the machine raises
        raise error

    hook = model.model.layers[1].register_forward_pre_hook(oom)
    try:
        with pytest.raises(LxtPlusError, match="checkpointing=True"):
            explain(model, ids, attention_mask=mask)
    finally:
        hook.remove()
        assert not is_patched(model)
