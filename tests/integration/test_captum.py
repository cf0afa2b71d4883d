"""lxt_plus's LRP behind Captum's attribution API, checked with Captum's own utilities."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from captum.attr import LayerGradientXActivation, NoiseTunnel
from captum.attr import visualization as viz
from torch import nn

import lxt_plus
from lxt_plus.captum import LRP, LayerLRP
from lxt_plus.engine.patching import _PATCHED
from lxt_plus.errors import InputError, MissingDependencyError

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402

TOKENS = torch.tensor([[4, 45, 10, 16, 21], [5, 46, 11, 30, 8]])


def _next_token(model: nn.Module):
    def forward(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]

    return forward


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp", "ah-lrp"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lrp_on_embeddings_equals_explain(family: str, rules: str) -> None:
    model = F.randomize_biases_and_norms(F.build(family))
    targets = [7, 12]
    embeds = model.get_input_embeddings()(TOKENS).detach()
    mask = torch.ones_like(TOKENS)
    lrp = LRP(_next_token(model), rules, model=model)
    attr, delta = lrp.attribute(
        embeds, target=targets, additional_forward_args=(mask,), return_convergence_delta=True
    )
    ref = lxt_plus.explain(model, TOKENS, target=targets, rules=rules)
    assert attr.shape == embeds.shape
    torch.testing.assert_close(attr.sum(-1), ref.relevance, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(delta, ref.relevance.sum(-1) - ref.target_logit, rtol=1e-5, atol=1e-5)
    assert _PATCHED.get(model) is None, "the model stays patched after attribute()"


def test_layer_lrp_from_input_ids_equals_explain() -> None:
    model = F.randomize_biases_and_norms(F.build("qwen2"))
    layer = LayerLRP(model, model.get_input_embeddings(), rules="attnlrp")
    attr = layer.attribute(TOKENS, target=(TOKENS.shape[1] - 1, 9))  # (position, token): Captum's tuple
    ref = lxt_plus.explain(model, TOKENS, target=9)
    torch.testing.assert_close(attr.sum(-1), ref.relevance, rtol=1e-6, atol=1e-6)
    assert not attr.requires_grad


def test_gradient_preset_is_captums_gradient_x_activation() -> None:
    """With the plain-gradient preset the layer relevance is Captum's own LayerGradientXActivation."""
    model = F.randomize_biases_and_norms(F.build("llama"))

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits[:, -1]

    ours = LayerLRP(forward, model.get_input_embeddings(), rules="gradient", model=model).attribute(TOKENS, 3)
    theirs = LayerGradientXActivation(forward, model.get_input_embeddings()).attribute(TOKENS, 3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    lrp = LayerLRP(forward, model.get_input_embeddings(), rules="attnlrp", model=model).attribute(TOKENS, 3)
    assert (lrp - theirs).abs().max() > 1e-3, "AttnLRP should differ from the plain gradient here"


def test_noise_tunnel_wraps_it() -> None:
    """Captum's NoiseTunnel calls attribute() as for its own classes; zero noise changes nothing."""
    model = F.build("llama")
    embeds = model.get_input_embeddings()(TOKENS).detach()
    mask = torch.ones_like(TOKENS)
    lrp = LRP(_next_token(model), "attnlrp", model=model)
    plain = lrp.attribute(embeds, target=3, additional_forward_args=(mask,))
    smooth = NoiseTunnel(lrp).attribute(
        embeds, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, target=3, additional_forward_args=(mask,)
    )
    torch.testing.assert_close(smooth, plain, rtol=1e-5, atol=1e-6)


def test_captum_text_visualization_takes_it() -> None:
    model = F.build("llama")
    tok = F.tiny_tokenizer()
    embeds = model.get_input_embeddings()(TOKENS[:1]).detach()
    attr = LRP(_next_token(model), model=model).attribute(
        embeds, target=3, additional_forward_args=(torch.ones_like(TOKENS[:1]),)
    )
    scores = attr.sum(-1)[0]
    words = tok.convert_ids_to_tokens(TOKENS[0].tolist())
    record = viz.VisualizationDataRecord(
        scores / scores.abs().max(), 0.5, "3", "3", "3", float(scores.sum()), words, 0.0
    )
    html = viz.visualize_text([record], legend=False)
    assert all(w in html.data for w in words)


def test_plain_module_is_its_own_forward() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    attr = LRP(mlp, "attnlrp").attribute(x, target=[0, 1, 2, 0])
    ref = lxt_plus.explain(mlp, x, target=[0, 1, 2, 0])
    torch.testing.assert_close(attr, ref.relevance, rtol=1e-6, atol=1e-7)


def test_model_is_unchanged_afterwards() -> None:
    model = F.randomize_biases_and_norms(F.build("llama"))
    before = model(input_ids=TOKENS).logits
    flags = [p.requires_grad for p in model.parameters()]
    embeds = model.get_input_embeddings()(TOKENS).detach()
    LRP(_next_token(model), model=model).attribute(embeds, 3, (torch.ones_like(TOKENS),))
    assert torch.equal(model(input_ids=TOKENS).logits, before)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_bad_use_fails_clearly() -> None:
    model = F.build("llama")
    embeds = model.get_input_embeddings()(TOKENS).detach()
    with pytest.raises(InputError, match="pass target="):
        LRP(_next_token(model), model=model).attribute(
            embeds, additional_forward_args=(torch.ones_like(TOKENS),)
        )
    with pytest.raises(InputError, match="pass model="):
        LRP(lambda x: x.sum(-1))


def test_missing_captum_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    monkeypatch.delitem(sys.modules, "lxt_plus.captum")
    with pytest.raises(MissingDependencyError, match="pip install"):
        importlib.import_module("lxt_plus.captum")
    monkeypatch.undo()
    importlib.import_module("lxt_plus.captum")
