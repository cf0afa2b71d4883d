"""Models dispatched by accelerate (disk and CPU offload hooks) explain like the same model in one piece."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain, get_preset  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402
from lxt_plus.engine.rules import Gamma  # noqa: E402

IDS = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0]])
MASK = (IDS != 0).long()


def biased(family: str) -> nn.Module:
    """A tiny model whose biases are not zero (random init leaves them at 0)."""
    model = build(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() == 1 and "norm" not in name and "ln" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def device_map(model: nn.Module) -> dict[str, str]:
    """Every second decoder layer and the LM head on disk, the rest on the CPU."""
    prefix = model.base_model_prefix
    out = {}
    for name, child in getattr(model, prefix).named_children():
        if isinstance(child, nn.ModuleList):
            out.update({f"{prefix}.{name}.{i}": "disk" if i % 2 else "cpu" for i in range(len(child))})
        else:
            out[f"{prefix}.{name}"] = "cpu"
    out["lm_head"] = "disk"
    return out


def disk_offload(model: nn.Module, folder: Path) -> nn.Module:
    from accelerate import dispatch_model

    return dispatch_model(model, device_map(model), offload_dir=str(folder))


def cpu_offload(model: nn.Module, folder: Path) -> nn.Module:
    from accelerate import cpu_offload as offload

    return offload(model, execution_device=torch.device("cpu"))


def hooked_forwards(model: nn.Module) -> dict[str, Any]:
    return {name: m.__dict__["forward"] for name, m in model.named_modules() if "forward" in m.__dict__}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


OFFLOADS: dict[str, Callable[[nn.Module, Path], nn.Module]] = {"disk": disk_offload, "cpu": cpu_offload}


@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_offloaded_model_matches_one_piece(family: str, rules: str, offload: str, tmp_path: Path) -> None:
    reference = explain(biased(family), IDS, attention_mask=MASK, rules=rules)
    model = OFFLOADS[offload](biased(family), tmp_path)
    assert any(p.device.type == "meta" for p in model.parameters()), "nothing was offloaded"
    hooks, before = hooked_forwards(model), logits(model)
    assert hooks and all(isinstance(f, functools.partial) for f in hooks.values())
    exp = explain(model, IDS, attention_mask=MASK, rules=rules)
    torch.testing.assert_close(exp.relevance, reference.relevance, rtol=0, atol=1e-5)
    torch.testing.assert_close(exp.target_logit, reference.target_logit, rtol=0, atol=1e-5)
    assert not is_patched(model)
    after = hooked_forwards(model)  # accelerate's instance forwards are back, the very same objects
    assert after.keys() == hooks.keys() and all(after[k] is hooks[k] for k in hooks)
    assert torch.equal(logits(model), before)


def test_conservative_check_refuses_offloaded_biases(tmp_path: Path) -> None:
    from lxt_plus.errors import UnsupportedModelError

    model = disk_offload(biased("qwen2"), tmp_path)
    before = logits(model)
    with pytest.raises(UnsupportedModelError, match="offloaded weights .* needs the model in one piece"):
        explain(model, IDS, attention_mask=MASK, rules="conservative-check")
    assert not is_patched(model)
    assert torch.equal(logits(model), before)


def test_gamma_rule_on_offloaded_linear(tmp_path: Path) -> None:
    preset = get_preset("attnlrp").override("linear", Gamma(0.25))
    reference = explain(build("llama"), IDS, attention_mask=MASK, rules=preset)
    model = disk_offload(build("llama"), tmp_path)
    exp = explain(model, IDS, attention_mask=MASK, rules=preset)
    torch.testing.assert_close(exp.relevance, reference.relevance, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_split_across_cpu_and_disk(tmp_path: Path) -> None:
    models = pytest.importorskip("lxt_plus.demo")
    try:
        model, tokenizer = models.load_smollm2()
    except ImportError as exc:
        pytest.skip(str(exc))
    prompt = "The capital of France is"
    reference = explain(model, prompt, tokenizer=tokenizer)
    assert reference.target.label == " Paris"
    model = disk_offload(model, tmp_path)
    hooks = hooked_forwards(model)
    exp = explain(model, prompt, tokenizer=tokenizer)
    assert exp.target.label == " Paris" and exp.tokens == reference.tokens
    torch.testing.assert_close(exp.relevance, reference.relevance, rtol=0, atol=1e-5)
    assert not is_patched(model) and hooked_forwards(model).keys() == hooks.keys()


@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_backward_pass_does_not_keep_offloaded_weights(
    offload: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each offloaded linear layer's weight is saved for the backward pass as a reference to the
    offload store, not as the loaded tensor (which would pull the whole model into memory), and
    is read back from there: the relevance is the one-piece model's."""
    from lxt_plus.engine import offload as off

    reference = explain(build("llama"), IDS, attention_mask=MASK).relevance
    model = OFFLOADS[offload](build("llama"), tmp_path)
    offloaded = {
        id(m)
        for h_owner in model.modules()
        if off.offload_hooks(h_owner)
        for m in h_owner.modules()
        if isinstance(m, nn.Linear)
    }
    assert offloaded, "no linear layer is offloaded"
    saved: list[str] = []
    real = off._Reload

    class Counting(real):  # type: ignore[misc, valid-type]
        def load(self) -> torch.Tensor:
            saved.append(self.name)
            return super().load()

    monkeypatch.setattr(off, "_Reload", Counting)
    exp = explain(model, IDS, attention_mask=MASK)
    # every offloaded Linear's weight (tied embeddings aside) was saved by reference and read back
    assert sum(name.endswith("weight") for name in saved) >= len(offloaded) - 1
    torch.testing.assert_close(exp.relevance, reference, rtol=0, atol=1e-5)


def test_memory_estimate_leaves_out_offloaded_weights(tmp_path: Path) -> None:
    """The probe's per-token figure of an offloaded model is that of the model in one piece: the
    weights the hooks load during the probe are weights, not activations."""
    from lxt_plus import patch

    def per_token(model: nn.Module) -> float:
        handle = patch(model, "attnlrp")
        report = handle.plan.operations
        handle.remove()
        assert report is not None and report.memory is not None
        return report.memory.per_token

    whole = per_token(build("llama"))
    assert per_token(disk_offload(build("llama"), tmp_path)) == pytest.approx(whole, rel=1e-6)
