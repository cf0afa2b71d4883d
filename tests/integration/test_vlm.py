"""A vision-language model (LLaVA: CLIP vision tower, two-layer projector, Llama) against an
independent float64 LRP reference, and its generation matrix against ``explain`` row by row.

The reference extends the relevance tape of ``test_reference_lrp.py`` with the vision side, from
the weights alone: the patch convolution as a linear map over unfolded patches, the class token
and the position table, CLIP's pre-LayerNorm encoder layers (bidirectional attention, quick-GELU),
the feature layer LLaVA reads (``vision_feature_layer``, the class token dropped), the projector
(linear, GELU, linear), and the image features written over the image placeholder tokens. Pixel
relevance is read at the pixels, token relevance at the token embeddings (0 where a placeholder
was replaced), position relevance at CLIP's position table.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

import lxt_plus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reference_lrp import (  # noqa: E402
    DTYPE,
    Node,
    Tape,
    bias_of,
    gelu_erf,
    llama_reference,
    merge_heads,
    split_heads,
    weight_of,
)

IMAGE_TOKEN = 100
IMAGE, PATCH = 16, 4
N_PATCHES = (IMAGE // PATCH) ** 2


# the language model and the vision tower of the tiny vision-language models (LLaVA, LLaVA-Next)
TEXT = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}
VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE,
    "patch_size": PATCH,
}


def tiny_llava(seed: int = 0) -> nn.Module:
    cfg = tf.LlavaConfig(
        text_config=TEXT, vision_config=VISION, image_token_id=IMAGE_TOKEN, projector_hidden_act="gelu"
    )
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(cfg).eval().to(DTYPE)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # biases, norm weights and the class token away from HF's 0 / 1
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=DTYPE)
            if name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "norm" in name.lower() or "class_embedding" in name:
                p.copy_(1.0 + 0.3 * noise)
    return model


class VisionTape(Tape):
    """The tape with the two operations the vision side adds."""

    def concat(self, a: Node, b: Node) -> Node:
        """Rows of ``a`` then rows of ``b``; relevance split back by rows."""
        n = a.value.shape[0]

        def message(r: Tensor) -> None:
            a.receive(r[:n])
            b.receive(r[n:])

        return self._record(Node(torch.cat([a.value, b.value])), message)

    def scatter(self, base: Node, rows: Tensor, src: Node) -> Node:
        """``base`` with ``rows`` replaced by ``src`` (image features over placeholder tokens)."""
        value = base.value.clone()
        value[rows] = src.value

        def message(r: Tensor) -> None:
            kept = r.clone()
            kept[rows] = 0
            base.receive(kept)
            src.receive(r[rows])

        return self._record(Node(value), message)

    def attention_bidirectional(self, q: Node, k: Node, v: Node, scale: float) -> Node:
        n = q.value.shape[1]
        return self.attention(q, k, v, torch.ones(n, n, dtype=torch.bool), scale)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def llava_reference(
    model: nn.Module, ids: Tensor, pixels: Tensor, token: int, rules: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(token relevance (seq,), pixel relevance (C, H, W), position relevance, target logit)``."""
    zero = rules == "conservative-check"
    tape = VisionTape("ah-lrp" if rules in ("ah-lrp", "conservative-check") else "attnlrp", hf_float32=True)
    tower = model.model.vision_tower
    emb = tower.embeddings
    pix = tape.leaf(pixels.to(DTYPE))
    c, grid = pixels.shape[0], IMAGE // PATCH

    def unfold(t: Tensor) -> Tensor:  # (C, H, W) -> (patches, C·P·P), in the conv weight's order
        return t.reshape(c, grid, PATCH, grid, PATCH).permute(1, 3, 0, 2, 4).reshape(grid * grid, -1)

    patches = tape.linear(tape.rearrange(pix, unfold), weight_of(emb.patch_embedding).reshape(32, -1).T, None)
    cls_value = emb.class_embedding.detach().to(DTYPE)[None]
    cls = Node(torch.zeros_like(cls_value) if zero else cls_value)  # zeroed for the check, like a bias
    positions = tape.leaf(weight_of(emb.position_embedding)[torch.arange(N_PATCHES + 1)])
    h = tape.add(tape.concat(cls, patches), positions)
    pre = tower.pre_layrnorm
    h = tape.layer_norm(h, weight_of(pre), bias_of(pre, zero), pre.eps)
    heads, dh = 4, 8
    n = N_PATCHES + 1
    layer_index = model.config.vision_feature_layer  # hidden_states[k]: 0 is the pre-norm output
    used = tower.encoder.layers[
        : len(tower.encoder.layers) + 1 + layer_index if layer_index < 0 else layer_index
    ]
    for layer in used:
        attn = layer.self_attn
        a = tape.layer_norm(
            h, weight_of(layer.layer_norm1), bias_of(layer.layer_norm1, zero), layer.layer_norm1.eps
        )
        q = tape.rearrange(
            tape.linear(a, weight_of(attn.q_proj).T, bias_of(attn.q_proj, zero)), split_heads(n, heads, dh)
        )
        k = tape.rearrange(
            tape.linear(a, weight_of(attn.k_proj).T, bias_of(attn.k_proj, zero)), split_heads(n, heads, dh)
        )
        v = tape.rearrange(
            tape.linear(a, weight_of(attn.v_proj).T, bias_of(attn.v_proj, zero)), split_heads(n, heads, dh)
        )
        o = tape.rearrange(tape.attention_bidirectional(q, k, v, dh**-0.5), merge_heads)
        h = tape.add(h, tape.linear(o, weight_of(attn.out_proj).T, bias_of(attn.out_proj, zero)))
        b = tape.layer_norm(
            h, weight_of(layer.layer_norm2), bias_of(layer.layer_norm2, zero), layer.layer_norm2.eps
        )
        f = tape.activation(
            tape.linear(b, weight_of(layer.mlp.fc1).T, bias_of(layer.mlp.fc1, zero)), quick_gelu
        )
        h = tape.add(h, tape.linear(f, weight_of(layer.mlp.fc2).T, bias_of(layer.mlp.fc2, zero)))
    feats = tape.rearrange(h, lambda t: t[1:])  # the "default" strategy drops the class token
    proj = model.model.multi_modal_projector
    p1 = tape.activation(
        tape.linear(feats, weight_of(proj.linear_1).T, bias_of(proj.linear_1, zero)), gelu_erf
    )
    image_features = tape.linear(p1, weight_of(proj.linear_2).T, bias_of(proj.linear_2, zero))
    rows = (ids == IMAGE_TOKEN).nonzero()[:, 0]
    language = types.SimpleNamespace(
        config=model.config.text_config, model=model.model.language_model, lm_head=model.lm_head
    )
    ref = llama_reference(
        language,  # type: ignore[arg-type]
        ids,
        torch.ones_like(ids),
        (ids.shape[0] - 1, token),
        tape,
        zero_bias=zero,
        embed=lambda tokens: tape.scatter(tokens, rows, image_features),
    )
    ref.tape.propagate(ref.target)
    assert pix.relevance is not None and ref.tokens.relevance is not None and positions.relevance is not None
    return ref.tokens.relevance.sum(-1), pix.relevance, positions.relevance.sum(), ref.target.value


def _prompt() -> tuple[Tensor, Tensor]:
    ids = torch.tensor([1, 5, 6, *([IMAGE_TOKEN] * N_PATCHES), 7, 8])
    pixels = torch.randn(3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    return ids, pixels


@pytest.fixture(scope="module")
def llava() -> nn.Module:
    return tiny_llava()


@pytest.mark.parametrize("rules", ["conservative-check", "ah-lrp", "attnlrp"])
def test_llava_matches_the_reference(llava: nn.Module, rules: str) -> None:
    ids, pixels = _prompt()
    token = 9
    got = lxt_plus.explain(
        llava, {"input_ids": ids[None], "pixel_values": pixels[None]}, target=token, rules=rules
    )
    ref_tokens, ref_pixels, ref_positions, ref_logit = llava_reference(llava, ids, pixels, token, rules)
    torch.testing.assert_close(got.target_logit[0], ref_logit.detach(), rtol=1e-10, atol=1e-12)
    scale = float(max(ref_tokens.abs().max(), ref_pixels.abs().max()))
    atol = 5e-7 * scale  # Llama's RMSNorm runs in float32 (see test_reference_lrp.atol_factor)
    torch.testing.assert_close(got.batch_relevance[0].to(DTYPE), ref_tokens, rtol=1e-5, atol=atol)
    assert got.channel_relevance is not None
    torch.testing.assert_close(got.channel_relevance[0].to(DTYPE), ref_pixels, rtol=1e-5, atol=atol)
    c = got.conservation
    torch.testing.assert_close(c["position_relevance"][0].to(DTYPE), ref_positions, rtol=1e-5, atol=atol)
    assert float(got.batch_relevance[0, 3 : 3 + N_PATCHES].abs().max()) == 0.0  # replaced placeholders
    if rules == "conservative-check":
        assert abs(float(c["absorbed"])) <= 1e-6 * abs(float(c["target_logit"]))  # float32 RMSNorm
        total = ref_tokens.sum() + ref_pixels.sum() + ref_positions
        torch.testing.assert_close(total, ref_logit, rtol=1e-6, atol=1e-12)  # the reference conserves too


def test_the_reference_tells_the_rules_apart(llava: nn.Module) -> None:
    ids, pixels = _prompt()
    a = llava_reference(llava, ids, pixels, 9, "ah-lrp")[1]
    b = llava_reference(llava, ids, pixels, 9, "attnlrp")[1]
    assert float((a - b).abs().max()) > 1e-3 * float(a.abs().max())


def test_generation_rows_equal_explain(llava: nn.Module) -> None:
    ids, pixels = _prompt()
    prompt = {"input_ids": ids[None], "pixel_values": pixels[None]}
    gen = lxt_plus.explain_generation(llava, None, prompt, continuation=[9, 12, 3], rules="attnlrp")
    assert gen.image_matrix is not None and gen.image_matrix.shape == (3, 1, IMAGE, IMAGE)
    assert gen.patch_matrix().shape == (3, 1, IMAGE // PATCH, IMAGE // PATCH)
    n_p = gen.prompt_length
    for t in range(3):
        row = lxt_plus.explain(
            llava,
            {"input_ids": gen.token_ids[None, : n_p + t], "pixel_values": pixels[None]},
            target=int(gen.token_ids[n_p + t]),
            rules="attnlrp",
        )
        scale = float(row.relevance.abs().max())
        torch.testing.assert_close(
            gen.matrix[t, : n_p + t].to(DTYPE), row.relevance[0].to(DTYPE), rtol=1e-5, atol=1e-5 * scale
        )
        assert row.image_relevance is not None
        torch.testing.assert_close(
            gen.image_matrix[t, 0].to(DTYPE), row.image_relevance[0].to(DTYPE), rtol=1e-5, atol=1e-5 * scale
        )


def test_patchified_pixels_are_refused_by_name(llava: nn.Module) -> None:
    from lxt_plus.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="nor pre-cut patches with image_grid_thw"):
        lxt_plus.explain_generation(
            llava,
            None,
            [1, 5, 6],
            continuation=[9],
            images={"pixel_values": torch.randn(16, 48, dtype=DTYPE)},
        )


def test_images_must_belong_to_rows(llava: nn.Module) -> None:
    from lxt_plus.errors import InputError

    ids, pixels = _prompt()
    batch = {"input_ids": ids[None].repeat(2, 1), "pixel_values": pixels[None].repeat(3, 1, 1, 1)}
    with pytest.raises(InputError, match="3 images for 2 rows"):
        lxt_plus.explain(llava, batch, target=9)


def test_the_views_show_the_image_beside_the_tokens(llava: nn.Module) -> None:
    """A vision-language explanation's HTML shows each image of the row overlaid with its pixel
    relevance, and the sentence under the heatmap says how much the image carries."""
    import re

    ids, pixels = _prompt()
    res = lxt_plus.explain(llava, {"input_ids": ids[None], "pixel_values": pixels[None]}, target=9)
    assert res.image_relevance is not None
    total = f"{float(res.image_relevance[0].sum()):+.4g}"
    page = res.to_html()
    found = re.findall(
        r'image relevance \(its own colour scale[^<]*<b>([^<]*)</b><br><img[^>]*src="data:image/png', page
    )
    assert found == [total]
    assert f"The image carries {float(res.image_relevance[0].sum()):+.3g}." in res.summary()
    fig = res.plot()
    titles = [a.get_title() for a in fig.axes[0].child_axes]
    assert titles == [f"image {float(res.image_relevance[0].sum()):+.3g}"]
    gen = lxt_plus.explain_generation(
        llava, None, {"input_ids": ids[None], "pixel_values": pixels[None]}, continuation=[9, 12]
    )
    assert f"The image carries {float(gen.image_matrix[1].sum()):+.3g}." in gen.to_terminal(
        color=False, width=1000
    )


def test_ids_that_do_not_match_the_images_are_refused_by_name(llava: nn.Module) -> None:
    """Too few image placeholders for the vision tower's features: transformers' ValueError from
    inside the model becomes an InputError with the fix, in explain and explain_generation."""
    from lxt_plus.errors import InputError

    ids, pixels = _prompt()
    short = {"input_ids": torch.cat([ids[:3], ids[5:]])[None], "pixel_values": pixels[None]}  # 2 fewer
    with pytest.raises(InputError, match="rejected the token ids with these images.*processor"):
        lxt_plus.explain(llava, short, target=9)
    with pytest.raises(InputError, match="rejected the token ids with these images"):
        lxt_plus.explain_generation(llava, None, short, continuation=[9])
    with pytest.raises(InputError, match="rejected the token ids with these images"):
        lxt_plus.explain_generation(llava, None, short, max_new_tokens=1)


class _Processor:
    """A processor as transformers' are called: ``(text=..., images=..., return_tensors="pt")``."""

    tokenizer = None

    def __call__(self, text=None, images=None, return_tensors=None):  # type: ignore[no-untyped-def]
        assert return_tensors == "pt"
        ids, _ = _prompt()
        pixels = torch.as_tensor(images, dtype=DTYPE)[None]
        return {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel()), "pixel_values": pixels}


def test_text_and_images_with_a_processor(llava: nn.Module) -> None:
    ids, pixels = _prompt()
    direct = lxt_plus.explain(llava, {"input_ids": ids[None], "pixel_values": pixels[None]}, target=9)
    via = lxt_plus.explain(llava, "Describe the image.", target=9, images=pixels, processor=_Processor())
    torch.testing.assert_close(via.batch_relevance, direct.batch_relevance)
    assert via.image_relevance is not None and direct.image_relevance is not None
    torch.testing.assert_close(via.image_relevance, direct.image_relevance)
    from lxt_plus.errors import InputError

    with pytest.raises(InputError, match="go together"):
        lxt_plus.explain(llava, "Describe the image.", images=pixels)


# ----------------------------------------------------------------------------- other input layouts
def _zoo_vlm(model_type: str) -> tuple[nn.Module, dict[str, Tensor]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import zoo

    model = zoo.build(model_type, "image-text")
    with torch.no_grad():  # Gemma3 initialises its image projection to zero: nothing would reach the image
        for weight in model.parameters():
            if weight.dim() >= 2 and not weight.any():
                weight.normal_(0, 0.2)
    return model, zoo._vlm_inputs(model)


def test_pre_cut_patches_go_back_into_the_image() -> None:
    """Qwen2-VL's processor cuts each image into merge windows of patches, each repeated over
    ``temporal_patch_size`` frames; ``as_images`` puts them back where they came from."""
    import numpy as np
    from transformers import Qwen2VLImageProcessorPil

    from lxt_plus.api.explain import as_images

    model, _ = _zoo_vlm("qwen2_vl")
    v = model.config.vision_config
    proc = Qwen2VLImageProcessorPil(
        patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size, merge_size=v.spatial_merge_size
    )
    gen = np.random.default_rng(0)
    images = [(gen.random((16, 24, 3)) * 255).astype(np.uint8) for _ in range(2)]
    out = proc(images=images, return_tensors="pt", do_resize=False, do_rescale=False, do_normalize=False)
    assert out["pixel_values"].dim() == 2
    back = as_images(model, out["pixel_values"].double(), out["image_grid_thw"], copies="mean")
    want = torch.stack([torch.from_numpy(i).permute(2, 0, 1).double() for i in images])
    torch.testing.assert_close(back, want, rtol=0, atol=0)
    summed = as_images(model, out["pixel_values"].double(), out["image_grid_thw"])
    torch.testing.assert_close(summed, v.temporal_patch_size * want)


@pytest.mark.parametrize("model_type", ["qwen2_vl", "smolvlm", "gemma3", "paligemma"])
def test_other_layouts_give_pixel_relevance(model_type: str) -> None:
    """Pre-cut patches (Qwen2-VL), ``(rows, images, C, H, W)`` (SmolVLM), pooled patch tokens
    (Gemma3) and a projector into the text width (PaliGemma): relevance lands on the image grid,
    sums with the tokens' and positions' to the logit, and a generation row equals ``explain``."""
    model, prompt = _zoo_vlm(model_type)
    one = lxt_plus.explain(model, prompt, rules="conservative-check")
    images = one.images
    assert images is not None and images.channels.dim() == 4 and images.channels.shape[1] == 3
    c = one.conservation
    assert abs(float(c["absorbed"][0])) <= 1e-4 * abs(float(c["target_logit"][0]))
    assert float(images.relevance.abs().sum()) > 0
    gen = lxt_plus.explain_generation(model, None, prompt, continuation=[9, 12], rules="attnlrp")
    assert gen.image_matrix is not None
    n_p = gen.prompt_length
    for t in range(2):
        row_prompt = {**prompt, "input_ids": gen.token_ids[None, : n_p + t]}
        for key in ("mm_token_type_ids", "token_type_ids"):  # text tokens after the prompt: type 0
            if key in prompt:
                row_prompt[key] = torch.nn.functional.pad(prompt[key], (0, t))
        row = lxt_plus.explain(model, row_prompt, target=int(gen.token_ids[n_p + t]), rules="attnlrp")
        scale = float(row.relevance.abs().max())
        torch.testing.assert_close(
            gen.matrix[t, : n_p + t].double(), row.relevance[0].double(), rtol=1e-4, atol=1e-4 * scale
        )
        assert row.image_relevance is not None
        torch.testing.assert_close(
            gen.image_matrix[t].double(), row.image_relevance.double(), rtol=1e-4, atol=1e-4 * scale
        )
