"""A vision-language model whose image layout the patch-time probe cannot build (LLaVA-Next's
tiles, whose count depends on the image size and the grid pinpoints): its vision tower is checked
on the first input with images instead, so an operation without a rule there is refused by name
rather than passing into the pixel relevance unnoticed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import Tensor, nn

import lxt_plus
from lxt_plus.engine.patching import _with_image, handle_of
from lxt_plus.errors import LxtPlusWarning, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vlm import IMAGE, IMAGE_TOKEN, TEXT, VISION  # noqa: E402


def tiny_llava_next() -> nn.Module:
    cfg = tf.LlavaNextConfig(
        text_config={**TEXT, "max_position_embeddings": 256},
        vision_config=VISION,
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[IMAGE, 2 * IMAGE]],
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = tf.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # biases and norm weights away from 0 / 1
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def tiles_input(model: nn.Module) -> dict[str, Tensor]:
    """One image as LLaVA-Next's processor gives it: the base view and its tiles, the image size,
    and as many placeholders as the vision tower gives features."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    tiles = image_size_to_num_patches((IMAGE, IMAGE), cfg.image_grid_pinpoints, IMAGE)
    gen = torch.Generator().manual_seed(2)
    pixels = torch.randn(1, tiles, 3, IMAGE, IMAGE, generator=gen)
    sizes = torch.tensor([[IMAGE, IMAGE]])
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels, image_sizes=sizes)
    feats = getattr(feats, "pooler_output", feats)
    count = sum(f.reshape(-1, f.shape[-1]).shape[0] for f in feats)
    ids = torch.cat(
        [torch.tensor([[1, 5]]), torch.full((1, count), IMAGE_TOKEN), torch.tensor([[7, 9, 11]])], 1
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_sizes": sizes,
    }


@pytest.fixture(scope="module")
def llava_next() -> nn.Module:
    return tiny_llava_next()


def test_the_probe_cannot_build_this_layout(llava_next: nn.Module) -> None:
    """The premise: none of the probe's image layouts is LLaVA-Next's, so the patch-time check
    runs on text alone."""
    assert _with_image(llava_next, {"input_ids": torch.tensor([[1, 2, 3, 4, 5]])}) is None
    with lxt_plus.patched(llava_next, "conservative-check") as handle:
        assert handle.plan.operations.checked and not handle.plan.operations.images


def test_the_vision_tower_is_checked_on_the_first_image_input(llava_next: nn.Module) -> None:
    inputs = tiles_input(llava_next)
    res = lxt_plus.explain(llava_next, inputs, rules="conservative-check")
    total = float(res.relevance.sum() + res.image_relevance.sum() + res.conservation["position_relevance"])
    assert total == pytest.approx(res.conservation["target_logit"], rel=1e-4)
    with lxt_plus.patched(llava_next, "conservative-check") as handle:  # the cached plan remembers
        assert handle.plan.operations.images


def test_audit_checks_the_vision_tower_outside_its_measurement() -> None:
    """audit on such a model: the first-image check runs before the module flows are measured, so
    each layer is measured once, and the verdict is the conservation's."""
    model = tiny_llava_next()
    report = lxt_plus.audit(model, "conservative-check", inputs=tiles_input(model))
    assert report.ok, report
    names = [layer.path for layer in report.layers]
    assert len(names) == len(set(names)) == model.config.text_config.num_hidden_layers


def test_an_unknown_operation_in_the_vision_tower_is_refused() -> None:
    model = tiny_llava_next()

    def gate(module: nn.Module, args: object, out: object) -> object:  # a product with no rule
        h = out[0] if isinstance(out, tuple) else out
        assert isinstance(h, Tensor)
        h = h * h.sigmoid()
        return (h, *out[1:]) if isinstance(out, tuple) else h

    model.model.vision_tower.encoder.layers[0].register_forward_hook(gate)  # the feature layer is -2
    inputs = tiles_input(model)
    lxt_plus.explain(model, {"input_ids": inputs["input_ids"][:, -3:]})  # text alone: nothing to see
    with pytest.raises(
        UnsupportedModelError, match=r"mul of two input-dependent tensors in model\.vision_tower"
    ):
        lxt_plus.explain(model, inputs)
    assert handle_of(model) is None  # restored
    with pytest.raises(
        UnsupportedModelError, match=r"mul of two input-dependent tensors in model\.vision_tower"
    ):
        lxt_plus.explain_generation(model, None, inputs, continuation=[9])  # the same check there
    with pytest.warns(LxtPlusWarning, match="NOT conservative"):
        lxt_plus.explain(model, inputs, strict=False)


def test_patch_lists_of_a_vision_language_model_go_back_onto_the_image() -> None:
    """LFM2-VL takes SigLIP2's patch lists (``(images, patches, P·P·C)`` with ``spatial_shapes``
    and ``pixel_attention_mask``): pixel relevance comes back on the image grid, in the layout of
    its own image processor (checked by cutting an image with it), and sums with the tokens'
    relevance to the logit under conservative-check. (LFM2-VL's processor cuts patches as
    SigLIP2's does; its own module needs torchvision, so SigLIP2's cuts the image here.)"""
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import zoo

    model = zoo.build("lfm2_vl", "image-text")
    inputs = zoo._vlm_inputs(model)
    rows, cols = (int(v) for v in inputs["spatial_shapes"][0])
    size = model.config.vision_config.patch_size
    image = torch.randn(1, 3, rows * size, cols * size, generator=torch.Generator().manual_seed(1))
    patches = torch.from_numpy(convert_image_to_patches(image[0].numpy(), size))[None]
    padded = inputs["pixel_values"].clone()
    padded[:, : rows * cols] = patches
    inputs["pixel_values"] = padded
    result = lxt_plus.explain(model, inputs, rules="conservative-check")
    torch.testing.assert_close(result.images.pixels, image)  # the processor's layout, undone
    assert result.images.channels.shape == image.shape
    c = result.conservation  # tokens, pixels and the vision tower's position table
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))
    assert abs(float(c["image_relevance"])) > 1e-3 * abs(float(c["target_logit"]))
    assert float(result.images.channels.abs().sum()) > 0  # the image takes relevance
    bad = {**inputs, "spatial_shapes": torch.tensor([[rows + 3, cols]])}  # more patches than the list holds
    with pytest.raises(lxt_plus.errors.InputError, match="do not hold a"):
        lxt_plus.explain(model, bad)
