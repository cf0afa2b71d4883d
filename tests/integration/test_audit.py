"""``audit`` runs explain's own forward and backward, and judges every module on what enters and
leaves it: encoder-decoders, images, and the ways model code hands outputs on."""

from __future__ import annotations

import sys

import pytest
import torch

import lxt_plus
from lxt_plus.errors import ConservationError

sys.path.insert(0, "tests")
import zoo  # noqa: E402


class _Exp(torch.nn.Module):  # an activation no rule knows: relevance leaks through it
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_audit_passes_and_names_a_leak_in_the_decoder(model_type: str) -> None:
    torch.set_num_threads(1)
    model = zoo.build(model_type, "seq2seq")
    report = lxt_plus.audit(model, "conservative-check")
    assert report.ok, str(report)
    assert report.total_error <= 1e-4
    # the decoder's layers are judged too, though the decoder stack embeds its own tokens
    judged = {f.path for f in report.flows}
    assert any(p.startswith("decoder.") or p.startswith("model.decoder.") for p in judged), judged
    decoder = model.decoder if model_type == "t5" else model.model.decoder
    block = decoder.block[0].layer[-1].DenseReluDense if model_type == "t5" else decoder.layers[0]
    name = "act" if model_type == "t5" else "activation_fn"
    setattr(block, name, _Exp())
    leaky = lxt_plus.audit(model, lxt_plus.get_preset("conservative-check").override("type:_Exp", "pass"))
    assert leaky.first_leak is not None and leaky.first_leak.path.endswith(name), str(leaky)
    assert "decoder" in leaky.first_leak.path
    with pytest.raises(ConservationError):
        leaky.raise_for_leak()


def test_vlm_audit_with_its_image_counts_hidden_states_read_beside_the_output() -> None:
    """LLaVA reads the vision tower's hidden state before the last layer, kept by transformers'
    output recorder: the relevance leaves each layer that way, not through the encoder's output."""
    torch.set_num_threads(1)
    model = zoo.build("llava", "image-text")
    inputs = zoo._inputs(model)
    report = lxt_plus.audit(model, "conservative-check", inputs=inputs)
    assert report.ok, str(report)
    flows = {f.path: f for f in report.flows}
    encoder = next(p for p in flows if p.endswith("vision_tower.encoder"))
    assert abs(flows[encoder].relevance_out) > 1e-6  # its share through the recorded hidden state
    assert abs(flows[encoder].relevance_out - flows[encoder].relevance_in) <= 1e-6


@pytest.mark.parametrize(
    "model_type",
    [
        "perceiver",  # a tuple whose first tensor is computed from its last (inputs_without_pos)
        "cvt",  # a tuple whose second tensor (the class token) is the one read
        "resnet",  # the caller adds the residual to the output in place
    ],
)
def test_image_classifier_audits_pass(model_type: str) -> None:
    torch.set_num_threads(1)
    model = zoo.build(model_type, "image-cls")
    report = lxt_plus.audit(model, "conservative-check")
    assert report.ok, str(report)
    assert len(report.flows) > 5
