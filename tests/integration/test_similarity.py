"""Image-text similarity (CLIP, SigLIP): the rule for the score, conservation, and the views.

The rule (``lxt_plus/api/similarity.py``): the norms of both embeddings are constants, and each
product ``a_d b_d`` of the dot product gets the uniform rule, half to each side. So the image side
must receive exactly what explaining ``½ · τ · ⟨a / ‖a‖, b / ‖b‖⟩`` with the text embedding ``b``
held constant gives, and the text side likewise; with biases zeroed both halves together with
the position tables add up to the score.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

import lxt_plus
from lxt_plus.errors import InputError, UnsupportedModelError

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TEXT = {**SMALL, "vocab_size": 128, "max_position_embeddings": 16, "eos_token_id": 2, "bos_token_id": 1}
VISION = {**SMALL, "image_size": 16, "patch_size": 4}


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    else:
        model = tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=VISION))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {
        "input_ids": torch.tensor([[1, 5, 6, 7, 2]]),
        "pixel_values": torch.randn(1, 3, 16, 16, generator=gen),
    }


def _half(model: nn.Module, inputs: dict[str, Any], rules: str, side: str) -> torch.Tensor:
    """The relevance one side gets by the rule's definition: the other embedding held constant,
    the norms constant, half of the score."""
    hf: Any = model
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    with lxt_plus.patched(model, rules):
        for p in model.parameters():
            p.requires_grad_(False)
        if side == "image":
            leaf = pixels.clone().requires_grad_(True)
            a = hf.get_image_features(pixel_values=leaf).pooler_output
            b = hf.get_text_features(input_ids=ids).pooler_output.detach()
        else:
            emb = hf.text_model.embeddings.token_embedding
            out: list[torch.Tensor] = []

            def hook(m: nn.Module, args: Any, o: torch.Tensor) -> torch.Tensor:
                out.append(o.detach().requires_grad_(True))
                return out[-1]

            handle = emb.register_forward_hook(hook)
            b = hf.get_image_features(pixel_values=pixels).pooler_output.detach()
            a = hf.get_text_features(input_ids=ids).pooler_output
            handle.remove()
            leaf = out[0]
        half = (
            0.5
            * hf.logit_scale.exp()
            * (a / a.detach().norm(dim=-1, keepdim=True) * b / b.norm(dim=-1, keepdim=True)).sum()
        )
        (grad,) = torch.autograd.grad(half, leaf)
    for p in model.parameters():
        p.requires_grad_(True)
    return (leaf * grad).detach()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_each_side_gets_half_by_the_uniform_rule(kind: str, rules: str) -> None:
    model, inputs = _model(kind), _inputs()
    sim = lxt_plus.explain_similarity(model, inputs, rules=rules)
    image = _half(model, inputs, rules, "image")
    torch.testing.assert_close(sim.images.channels, image, rtol=1e-5, atol=1e-6)
    text = _half(model, inputs, rules, "text").sum(-1)[0]
    torch.testing.assert_close(sim.token_relevance, text, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_similarity_conserves_with_biases_zeroed(kind: str) -> None:
    model, inputs = _model(kind), _inputs()
    sim = lxt_plus.explain_similarity(model, inputs, rules="conservative-check")
    c = sim.conservation
    assert abs(c["absorbed"]) <= 1e-5 * abs(c["score"]), c
    assert c["text_relevance"] != 0.0 and c["image_relevance"] != 0.0
    with torch.no_grad():  # the explained score is the model's own, with its biases restored after
        plain = float(model(**inputs).logits_per_image[0, 0])
    assert sim.image_relevance.shape == (16, 16) and sim.patch_relevance().shape == (4, 4)
    attn = lxt_plus.explain_similarity(model, inputs, rules="attnlrp")
    assert attn.score == pytest.approx(plain, rel=1e-5)


def test_similarity_view_and_errors() -> None:
    model, inputs = _model("clip"), _inputs()
    sim = lxt_plus.explain_similarity(model, inputs)
    html = sim.to_html()
    assert html.count("lxt-tok") >= 5 and "data:image/png;base64," in html and "similarity" in html
    assert "text=" in repr(sim) and set(sim.to_dict()) >= {"score", "token_relevance", "image_relevance"}
    with pytest.raises(InputError, match="one caption and one image"):
        lxt_plus.explain_similarity(
            model, {**inputs, "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)}
        )
    with pytest.raises(InputError, match="input_ids and pixel_values"):
        lxt_plus.explain_similarity(model, {"input_ids": inputs["input_ids"]})
    vit = tf.ViTForImageClassification(tf.ViTConfig(**SMALL, image_size=16, patch_size=4)).eval()
    with pytest.raises(UnsupportedModelError, match="not an image-text dual encoder"):
        lxt_plus.explain_similarity(vit, inputs)


def _bilrp_reference(model: nn.Module, inputs: dict[str, Any], rules: str) -> torch.Tensor:
    """BiLRP by its definition, one embedding dimension at a time: ``R_ij = τ Σ_d R_i(â_d) R_j(b̂_d)``
    with each ``R(·_d)`` the relevance of that one output (norm constant), patches summed."""
    hf: Any = model
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    size = model.config.vision_config.patch_size
    image_maps, text_maps = [], []
    with lxt_plus.patched(model, rules):
        for p in model.parameters():
            p.requires_grad_(False)
        leaf = pixels.clone().requires_grad_(True)
        a = hf.get_image_features(pixel_values=leaf).pooler_output[0]
        out: list[torch.Tensor] = []

        def hook(m: nn.Module, args: Any, o: torch.Tensor) -> torch.Tensor:
            out.append(o.detach().requires_grad_(True))
            return out[-1]

        handle = hf.text_model.embeddings.token_embedding.register_forward_hook(hook)
        b = hf.get_text_features(input_ids=ids).pooler_output[0]
        handle.remove()
        a, b = a / a.detach().norm(), b / b.detach().norm()
        for d in range(a.shape[0]):
            (g,) = torch.autograd.grad(a[d], leaf, retain_graph=True)
            r = (leaf * g).detach()[0].sum(0)
            image_maps.append(r.reshape(r.shape[0] // size, size, r.shape[1] // size, size).sum((1, 3)))
            (g,) = torch.autograd.grad(b[d], out[0], retain_graph=True)
            text_maps.append((out[0] * g).detach()[0].sum(-1))
    for p in model.parameters():
        p.requires_grad_(True)
    tau = float(hf.logit_scale.detach().exp())
    return tau * sum(i[..., None] * t for i, t in zip(image_maps, text_maps, strict=True))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_pairs_equal_bilrp_by_its_definition(kind: str, rules: str) -> None:
    model, inputs = _model(kind), _inputs()
    sim = lxt_plus.explain_similarity(model, inputs, rules=rules, pairs=True, chunk=5)
    assert sim.pairs is not None and sim.pairs.shape == (4, 4, 5)
    torch.testing.assert_close(sim.pairs, _bilrp_reference(model, inputs, rules), rtol=1e-4, atol=1e-6)
    first = lxt_plus.explain_similarity(model, inputs, rules=rules)  # pairs change nothing else
    torch.testing.assert_close(sim.token_relevance, first.token_relevance, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pairs_conserve_and_their_marginals_are_twice_the_first_order(kind: str) -> None:
    """With biases zeroed: the pairs and their position terms add up to the score. With the
    position tables zero as well, the pairs summed over the tokens are twice each patch's
    first-order relevance (the uniform rule gives each side half), and over the patches twice each
    token's."""
    model, inputs = _model(kind), _inputs()
    sim = lxt_plus.explain_similarity(model, inputs, rules="conservative-check", pairs=True)
    assert sim.pairs is not None and sim.pair_position_relevance is not None
    total = float(sim.pairs.sum()) + sim.pair_position_relevance
    assert total == pytest.approx(sim.score, rel=1e-4)
    assert sim.pair_position_relevance != 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "position_embedding" in name:
                p.zero_()
    sim = lxt_plus.explain_similarity(model, inputs, rules="conservative-check", pairs=True)
    assert sim.pairs is not None and sim.pair_position_relevance == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(sim.pairs.sum(-1), 2 * sim.patch_relevance(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sim.pairs.sum((0, 1)), 2 * sim.token_relevance, rtol=1e-4, atol=1e-6)


def test_pairs_views_and_errors() -> None:
    model, inputs = _model("clip"), _inputs()
    sim = lxt_plus.explain_similarity(model, inputs, pairs=True)
    assert sim.pairs is not None
    (where, token, value), *_ = sim.top_pairs(3)
    assert (
        value == pytest.approx(float(sim.pairs.max())) and sim.pairs[where][sim.tokens.index(token)] == value
    )
    torch.testing.assert_close(sim.token_patches(2), sim.pairs[..., 2])
    assert set(sim.to_dict()) >= {"pairs", "pair_position_relevance"}
    plain = lxt_plus.explain_similarity(model, inputs)
    with pytest.raises(InputError, match="pairs=True"):
        plain.top_pairs()
    with pytest.raises(InputError, match="not in the caption"):
        sim.token_patches("nowhere")
    with pytest.raises(InputError, match="chunk"):
        lxt_plus.explain_similarity(model, inputs, pairs=True, chunk=0)
