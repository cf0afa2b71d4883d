"""Every supported family, on tiny random configs: conservation, eager == sdpa, padding, dtypes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lxt_plus
import lxt_plus.errors
from lxt_plus.errors import NumericalError

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402

CASES = (
    [(f, "causal-lm") for f in F.DECODERS]
    + [(f, "seqcls") for f in F.SEQCLS]
    + [(f, "seqcls") for f in F.ENCODERS]
)


def total_relevance(res: lxt_plus.Explanation) -> torch.Tensor:
    extra = res.extra_relevance if res.extra_relevance is not None else 0.0
    return res.batch_relevance.sum(-1) + extra


@pytest.mark.parametrize(("family", "head"), CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_conservation_and_presets(family: str, head: str) -> None:
    """With biases zeroed and AH-LRP, input relevance (tokens + positions) equals the target logit."""
    model = F.build(family, head)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    res = lxt_plus.explain(model, ids, rules="conservative-check")
    torch.testing.assert_close(total_relevance(res), res.target_logit, rtol=1e-4, atol=1e-5)
    assert res.target_logit.abs().min() > 1e-2  # a meaningful logit, not a vacuous 0 == 0
    # the module-level audit agrees: no module leaks
    report = lxt_plus.audit(model, "ah-lrp", inputs=ids[:1])
    assert report.ok, str(report)
    # AttnLRP and plain gradient run, are finite, and differ from each other
    attn = lxt_plus.explain(model, ids, rules="attnlrp")
    grad = lxt_plus.explain(model, ids, rules="gradient")
    assert torch.isfinite(attn.batch_relevance).all()
    assert not torch.allclose(attn.batch_relevance, grad.batch_relevance, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "bert", "qwen3", "phi", "modernbert", "mixtral", "falcon"]
)
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_eager_and_sdpa_give_the_same_relevance(family: str, rules: str) -> None:
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # (right) padding exercises the masked path
    results = {}
    for impl in ("eager", "sdpa"):
        model = F.build(family, attn_implementation=impl)  # asserts the implementation is in effect
        results[impl] = lxt_plus.explain(model, ids, rules=rules, attention_mask=mask).batch_relevance
        assert model.config._attn_implementation == impl
    torch.testing.assert_close(results["eager"], results["sdpa"], rtol=1e-4, atol=1e-5)


def test_vit_pixel_relevance_is_conservative() -> None:
    model = F.tiny_vit()
    pixels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    res = lxt_plus.explain(model, pixels, rules="conservative-check")
    assert res.relevance.shape == (2, 8, 8) and res.modality == "pixels"
    torch.testing.assert_close(res.relevance.sum((-1, -2)), res.target_logit, rtol=1e-4, atol=1e-5)
    gamma = lxt_plus.get_preset("attnlrp").override("linear", lxt_plus.engine.rules.Gamma(gamma=0.25))
    res_g = lxt_plus.explain(model, pixels[0], rules=gamma)
    assert res_g.relevance.shape == (8, 8) and torch.isfinite(res_g.relevance).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "opt", "roberta", "qwen2_moe"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_rows_equal_single_sequences(family: str, side: str) -> None:
    model = F.build(family)
    encoder = family in F.ENCODERS
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 4, 5]
    seqs = [torch.randint(3, 90, (n,), generator=gen) for n in lengths]
    width = max(lengths)
    pad = model.config.pad_token_id
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[r, sl], mask[r, sl] = s, 1
    if encoder and side == "left":  # BERT-style classifiers read position 0: left padding is refused
        with pytest.raises(lxt_plus.errors.InputError, match="pad on the right"):
            lxt_plus.explain(model, ids, attention_mask=mask)
        return
    batch = lxt_plus.explain(model, ids, attention_mask=mask, rules="attnlrp")
    for r, s in enumerate(seqs):
        alone = lxt_plus.explain(model, s, rules="attnlrp")
        real = mask[r].bool()
        torch.testing.assert_close(batch.batch_relevance[r][real], alone.relevance, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.target_logit[r], alone.target_logit[0], rtol=1e-4, atol=1e-5)
        assert batch.targets[r].ids == alone.targets[0].ids
        assert torch.all(batch.batch_relevance[r][~real] == 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_bfloat16_is_finite_and_close_to_float32(family: str) -> None:
    model = F.build(family)
    ids = torch.randint(3, 90, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = lxt_plus.explain(model, ids[0], rules="attnlrp")
    res = lxt_plus.explain(model.to(torch.bfloat16), ids[0], rules="attnlrp")
    assert res.relevance.dtype == torch.float32
    assert torch.isfinite(res.relevance).all()
    cos = torch.nn.functional.cosine_similarity(res.relevance, ref.relevance, dim=0)
    assert cos > 0.95


def test_float16_works_or_raises_clearly() -> None:
    model = F.build("llama").to(torch.float16)
    ids = torch.randint(3, 90, (7,), generator=torch.Generator().manual_seed(5))
    ref = lxt_plus.explain(F.build("llama"), ids, rules="attnlrp").relevance
    try:
        res = lxt_plus.explain(model, ids, rules="attnlrp")
    except NumericalError as exc:
        assert "bfloat16" in str(exc)
        return
    assert torch.isfinite(res.relevance).all()
    assert torch.nn.functional.cosine_similarity(res.relevance, ref, dim=0) > 0.95


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_falcon_with_epsilon_on_linear_layers(impl: str) -> None:
    """ε > 0 on every Linear: Falcon modifies a Linear's output in place, which must not crash."""
    model = F.build("falcon", attn_implementation=impl)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(5))
    preset = lxt_plus.get_preset("attnlrp").override("linear", lxt_plus.engine.rules.Epsilon(eps=0.01))
    res = lxt_plus.explain(model, ids, rules=preset)
    plain = lxt_plus.explain(model, ids, rules="attnlrp")
    assert torch.isfinite(res.batch_relevance).all()
    assert not torch.allclose(res.batch_relevance, plain.batch_relevance, rtol=1e-4, atol=1e-6)
