"""Rules and fixes the image zoo forced, each against an independent reference.

- batch norm: torch's CPU backward is wrong for a transposed gradient layout at batch size 1;
  patching gives batch norms a dense gradient, so relevance equals the affine map's;
- ``nn.MultiheadAttention`` (SigLIP's pooling head): the attention rules through its projections;
- group norm: the conservative norm rule, the scale held constant;
- image models without token embeddings, composite configs, output without ``logits``, other dtypes.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import transformers as tf
from torch import nn

sys.path.insert(0, "tests")
import families as F  # noqa: E402

import lxt_plus  # noqa: E402
from lxt_plus.engine.attention import rule_mha  # noqa: E402
from lxt_plus.engine.detect import image_shape, input_embeddings  # noqa: E402
from lxt_plus.engine.modes import AttentionOpsMode  # noqa: E402
from lxt_plus.engine.opcheck import classify_node  # noqa: E402
from lxt_plus.errors import LxtPlusWarning, UnsupportedModelError  # noqa: E402


def test_torch_batch_norm_backward_bug_is_still_there() -> None:
    """The reason for the dense-gradient hook: if torch fixes this, the hook can go."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    y = nn.functional.batch_norm(x, torch.zeros(16), torch.rand(16) + 0.5, torch.rand(16) + 0.5, None)
    g = torch.randn(1, 4 * 4, 16).transpose(1, 2).view(1, 16, 4, 4)  # strides (16, 1, 64, 16)
    (bad,) = torch.autograd.grad(y, x, g, retain_graph=True)
    (good,) = torch.autograd.grad(y, x, g.contiguous())
    assert not torch.allclose(bad, good, atol=1e-3), "torch's batch-norm backward is fixed: drop the hook"


class _LevitLike(nn.Module):
    """conv -> batch norm -> tokens by ``flatten(2).transpose(1, 2)`` -> linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.norm.running_mean.normal_(0, 0.1)
            self.norm.running_var.uniform_(0.5, 1.5)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.conv(x)).flatten(2).transpose(1, 2)
        return self.head(tokens).mean(1)


def test_batch_norm_relevance_equals_its_affine_map() -> None:
    torch.manual_seed(0)
    model = _LevitLike().eval()
    x = torch.randn(1, 3, 8, 8)
    got = lxt_plus.explain(model, x, target=1, rules="gradient").relevance
    # reference: the same network with the batch norm written out as scale and shift
    bn = model.norm
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    shift = (bn.bias - bn.running_mean * scale).detach()
    leaf = x.clone().requires_grad_(True)
    h = model.conv(leaf) * scale[None, :, None, None] + shift[None, :, None, None]
    out = model.head(h.flatten(2).transpose(1, 2)).mean(1)
    (grad,) = torch.autograd.grad(out[0, 1], leaf)
    torch.testing.assert_close(got, (leaf * grad).detach(), rtol=1e-5, atol=1e-6)


def test_batch_norm_running_mean_is_zeroed_for_the_check() -> None:
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    torch.manual_seed(0)
    model = tf.ResNetForImageClassification(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.bias.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp = lxt_plus.explain(model, torch.randn(1, 3, 32, 32), rules="conservative-check")
    c = exp.conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit


# ------------------------------------------------------------------- nn.MultiheadAttention
MASKS = ["none", "padding", "attn_mask", "both", "float"]


def _masks(kind: str, n_q: int, n_k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    pad = torch.zeros(2, n_k, dtype=torch.bool)
    pad[0, -2:] = True
    attn = torch.rand(n_q, n_k, generator=gen) < 0.2
    attn[:, 0] = False  # every query keeps a key
    return {
        "none": {},
        "padding": {"key_padding_mask": pad},
        "attn_mask": {"attn_mask": attn},
        "both": {"attn_mask": attn, "key_padding_mask": pad},
        "float": {"attn_mask": torch.randn(n_q, n_k, generator=gen)},
    }[kind]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", MASKS)
def test_mha_rule_keeps_the_forward_values(batch_first: bool, kind: str) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    q, k = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    kwargs = _masks(kind, 3, 5)
    ref_out, ref_w = mha(q, k, k, **kwargs)
    with AttentionOpsMode(False):
        out, w = mha(q, k, k, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_mha_options_without_a_rule_are_refused() -> None:
    mha = nn.MultiheadAttention(16, 4, add_bias_kv=True, batch_first=True).eval()
    x = torch.randn(1, 3, 16, requires_grad=True)
    with AttentionOpsMode(True), pytest.raises(UnsupportedModelError, match="bias_k"):
        mha(x, x, x)
    with pytest.raises(UnsupportedModelError, match="add_zero_attn"):
        rule_mha((x, x, x, 16, 4, None, None, None, None, True, 0.0, torch.eye(16), None), {}, True)


class _Pooling(nn.Module):
    """A learned query attending over the input (SigLIP's head), then a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, 16))
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x)[0]
        return self.head(out[:, 0])


def _ah_lrp_reference(model: _Pooling, x: torch.Tensor, target: int) -> torch.Tensor:
    """AH-LRP from its definition, in float64: attention weights are constants, so relevance is
    Gradient×Input through the value and output projections only."""
    m = model.double()
    x = x.double().clone().requires_grad_(True)
    w_q, w_k, w_v = m.attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = m.attention.in_proj_bias.chunk(3)
    q = (m.probe @ w_q.T + b_q).reshape(1, 1, 4, 4).transpose(1, 2)
    k = (x @ w_k.T + b_k).reshape(1, -1, 4, 4).transpose(1, 2)
    v = (x @ w_v.T + b_v).reshape(1, -1, 4, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1).detach()
    out = (weights @ v).transpose(1, 2).reshape(1, 1, 16)
    out = m.attention.out_proj(out)
    logit = m.head(out[:, 0])[0, target]
    (grad,) = torch.autograd.grad(logit, x)
    return (x * grad).sum(-1).detach()


def test_mha_ah_lrp_equals_its_reference() -> None:
    torch.manual_seed(0)
    model = _Pooling().eval()
    x = torch.randn(1, 6, 16)
    got = lxt_plus.explain(model, x, target=2, rules="ah-lrp")
    ref = _ah_lrp_reference(model, x, 2)
    torch.testing.assert_close(got.batch_relevance.double().sum(-1)[0], ref[0], rtol=1e-5, atol=1e-6)


def test_mha_conserves_with_biases_zeroed() -> None:
    torch.manual_seed(0)
    model = _Pooling().eval()
    exp = lxt_plus.explain(model, torch.randn(1, 6, 16), target=0, rules="conservative-check")
    c = exp.conservation
    assert abs(float(c["absorbed"])) <= 1e-5 * abs(float(c["target_logit"]))


# ----------------------------------------------------------------------------- group norm
class _GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def test_group_norm_rule_holds_the_scale_constant() -> None:
    torch.manual_seed(0)
    model = _GroupNormNet().eval()
    x = torch.randn(1, 3, 6, 6)
    got = lxt_plus.explain(model, x, target=1, rules="ah-lrp")
    # reference in float64: (h - mean) * constant scale * weight + bias, then Gradient×Input
    m = model.double()
    leaf = x.double().clone().requires_grad_(True)
    h = m.conv(leaf).reshape(1, 2, -1)
    centred = h - h.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.detach().pow(2).mean(-1, keepdim=True) + m.norm.eps)
    y = (centred * scale).reshape(1, 8, 6, 6) * m.norm.weight[None, :, None, None]
    y = y + m.norm.bias[None, :, None, None]
    logit = m.head(y.mean((2, 3)))[0, 1]
    (grad,) = torch.autograd.grad(logit, leaf)
    want = (leaf * grad)[0].detach()
    torch.testing.assert_close(got.batch_relevance[0].double(), want, rtol=1e-5, atol=1e-7)


def test_group_norm_rule_keeps_the_forward_value() -> None:
    torch.manual_seed(0)
    model = _GroupNormNet().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with lxt_plus.patched(model, "ah-lrp") as handle:
        got = model(x)
    assert any(e.role == "norm" and e.path == "norm" for e in handle.plan.entries)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ image models, generally
_SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_image_models_without_token_embeddings() -> None:
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = tf.ResNetForImageClassification(cfg).eval()
    assert input_embeddings(model) is None  # transformers raises NotImplementedError here
    clip = tf.CLIPForImageClassification(
        tf.CLIPConfig(
            vision_config={**_SMALL, "image_size": 32, "patch_size": 8},
            text_config=_SMALL,
            num_labels=3,
        )
    ).eval()
    assert image_shape(clip) == (3, 32, 32)  # read from the vision config of a composite one


def test_clip_image_classifier_is_explained() -> None:
    """It used to crash with transformers' raw NotImplementedError from get_input_embeddings."""
    cfg = tf.CLIPConfig(
        vision_config={**_SMALL, "image_size": 32, "patch_size": 8},
        text_config=_SMALL,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = tf.CLIPForImageClassification(cfg).eval()
    with torch.no_grad():
        model.vision_model.embeddings.class_embedding.normal_()
    exp = lxt_plus.explain(model, torch.randn(1, 3, 32, 32), rules="conservative-check")
    c = exp.conservation
    assert exp.relevance.shape == (1, 32, 32)
    assert c["position_relevance"] is not None  # its position table is an nn.Embedding: reported
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))


def test_learned_token_concatenated_is_a_leak_under_conservative_check() -> None:
    vit = F.tiny_vit()
    emb = vit.vit.embeddings
    token = torch.randn(1, 1, emb.cls_token.shape[-1])
    real = type(emb).forward

    def forward(self, pixel_values, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(self, pixel_values, *args, **kwargs)
        return torch.cat([token.expand(out.shape[0], -1, -1), out], 1)

    emb.forward = forward.__get__(emb)
    with pytest.raises(UnsupportedModelError, match="concatenation of a non-zero constant"):
        lxt_plus.patch(vit, "conservative-check")
    with lxt_plus.patched(vit, "ah-lrp") as handle:  # biases (and such tokens) may absorb relevance there
        assert handle.plan.operations is not None and handle.plan.operations.ok


def test_custom_functions_of_the_model_are_not_covered_by_a_rule() -> None:
    """YOSO's LSH kernels are autograd Functions in transformers: a rule around them covers nothing."""

    class Kernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def]
            return g * 2

    x = torch.randn(3, requires_grad=True)
    Kernel.__module__ = "transformers.models.fake.modeling_fake"
    node = Kernel.apply(x).grad_fn
    assert classify_node(node, ruled=True)[0] == "custom"
    Kernel.__module__ = "my_rules"  # a user rule's own function, inside the module it rules
    node = Kernel.apply(x).grad_fn
    assert classify_node(node, ruled=True)[0] == "rule"
    assert classify_node(node, ruled=False)[0] == "custom"


def test_class_scores_outside_logits() -> None:
    class Scores(nn.Module):
        def forward(self, pixel_values):  # type: ignore[no-untyped-def]
            return tf.modeling_outputs.BaseModelOutput(last_hidden_state=pixel_values.mean((2, 3)))

    class NoScores(nn.Module):
        def forward(self, pixel_values):  # type: ignore[no-untyped-def]
            return tf.modeling_outputs.BaseModelOutput(last_hidden_state=pixel_values)

    from lxt_plus.api.explain import _image_logits

    x = torch.randn(2, 3, 4, 4)
    assert _image_logits(Scores(), Scores()(x)).shape == (2, 3)
    with pytest.raises(UnsupportedModelError, match="without \\(batch, classes\\) logits"):
        _image_logits(NoScores(), NoScores()(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_image_models_in_other_dtypes(dtype: torch.dtype) -> None:
    """The patch-time probe is made in the model's dtype (it was float32 whatever the model)."""
    model = F.tiny_vit().to(dtype)
    exp = lxt_plus.explain(model, torch.randn(1, 1, 8, 8, dtype=dtype), rules="attnlrp")
    assert torch.isfinite(exp.relevance.float()).all()


def test_images_of_the_wrong_shape_are_refused_clearly() -> None:
    from lxt_plus.errors import InputError

    model = F.tiny_vit()  # one channel
    with pytest.raises(InputError, match="1 channel.*got 3"):
        lxt_plus.explain(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="\\(batch, channels, height, width\\)"):
        lxt_plus.explain(model, torch.randn(8, 8))


def test_a_model_that_cannot_be_probed_warns() -> None:
    model = F.tiny_vit()
    model.main_input_name = "features"  # neither token ids nor an image the probe knows how to make
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        handle = lxt_plus.patch(model, "attnlrp")
    handle.remove()
    assert any(issubclass(w.category, LxtPlusWarning) and "not checked" in str(w.message) for w in seen)


@pytest.mark.parametrize("model_type", ["vit", "dinov2", "beit", "siglip", "clip", "swin"])
@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_eager_and_sdpa_give_the_same_image_relevance(model_type: str, rules: str) -> None:
    import zoo

    cfg = zoo.tiny_vision_config(model_type)
    got = {}
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = tf.AutoModelForImageClassification.from_config(cfg, attn_implementation=impl).eval()
        assert model.config._attn_implementation == impl
        zoo._reinitialise(model, 0)
        x = torch.randn(1, *image_shape(model), generator=torch.Generator().manual_seed(1))
        got[impl] = lxt_plus.explain(model.double(), x.double(), target=1, rules=rules).relevance
    # transformers' eager attention takes its softmax in float32 even in a float64 model: the two
    # implementations differ by float32 rounding (their logits too), not by the rules
    scale = float(got["eager"].abs().max())
    torch.testing.assert_close(got["eager"], got["sdpa"], rtol=1e-5, atol=1e-6 * scale)


def _siglip2() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import zoo

    model = zoo.build("siglip2", "image-cls")
    return model, zoo._inputs(model)


def test_siglip2_patch_lists_go_back_onto_the_image_grid() -> None:
    """The layout is transformers' own: an image cut by its SigLIP2 processor's
    ``convert_image_to_patches`` comes back exactly."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

    from lxt_plus.results.images import patch_list_images

    image = torch.randn(3, 12, 20, generator=torch.Generator().manual_seed(0))
    patches = torch.from_numpy(convert_image_to_patches(image.numpy(), 4))  # (15, 48): a 3 x 5 grid
    padded = torch.cat([patches, torch.zeros(5, 48)])[None]  # the processor pads the list
    torch.testing.assert_close(patch_list_images(padded, (3, 5), 4)[0], image, rtol=0, atol=0)


def test_siglip2_classifier_conserves_with_its_position_table() -> None:
    """SigLIP2 reads its learned position table whole and resizes it to the patch grid in forward:
    that read is a position leaf, so relevance conserves with the table's share reported."""
    model, inputs = _siglip2()
    res = lxt_plus.explain(model, inputs, rules="conservative-check")
    assert res.image_relevance is not None and res.image_relevance.shape == (1, 12, 16)  # 3 x 4 patches of 4
    c = res.conservation
    position = float(c["position_relevance"][0])
    assert abs(position) > 1e-3 * abs(float(c["target_logit"][0]))  # the table takes a share
    total = float(res.batch_relevance.sum()) + position
    assert total == pytest.approx(float(c["target_logit"][0]), rel=1e-6)
    assert lxt_plus.audit(model, "conservative-check", inputs=inputs).ok


def test_siglip2_inputs_it_cannot_read_are_refused_by_name() -> None:
    from lxt_plus.errors import InputError

    model, inputs = _siglip2()
    with pytest.raises(InputError, match="takes images as patch lists"):
        lxt_plus.explain(model, torch.randn(1, 3, 16, 16, dtype=torch.float64))
    two = {k: torch.cat([v, v]) for k, v in inputs.items()}
    two["spatial_shapes"] = torch.tensor([[3, 4], [4, 3]])
    with pytest.raises(InputError, match="different patch grids"):
        lxt_plus.explain(model, two)
    wrong = {**inputs, "spatial_shapes": torch.tensor([[5, 4]])}
    with pytest.raises(InputError, match="do not hold a 5 x 4 grid"):
        lxt_plus.explain(model, wrong)
    import zoo

    dual = tf.Siglip2Model(zoo.tiny_vision_config("siglip2")).eval()
    with pytest.raises(UnsupportedModelError, match="does not read patch lists"):
        lxt_plus.explain_similarity(dual, {"input_ids": torch.tensor([[5, 6, 7]]), **inputs})
