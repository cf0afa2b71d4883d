"""RWKV's time mixing (WKV) and channel mixing against an independent float64 reference.

The WKV output of channel ``c`` at token ``t`` is a weighted mean of the values,
``Σ_{i≤t} w_ti v_i`` with ``w_t = softmax_i(s_ti)``, ``s_ti = k_i + (t-1-i)·w`` for ``i < t`` and
``s_tt = u + k_t`` (``w = -exp(time_decay)``, ``u = time_first``). transformers computes it as a
recurrence with running maxima, so the weights never appear. Holding the attention weights
constant (AH-LRP, and ``conservative-check``), the rule detaches every ``exp`` in the attention
module: the output is then linear in the values. The reference builds the weight matrix explicitly
and detaches it; the receptance gate ``sigmoid(r) · wkv`` is split half and half with the identity
rule on the sigmoid, and the channel mix's ``square(relu(k))`` takes the identity rule.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

sys.path.insert(0, "tests")
import zoo  # noqa: E402

import lxt_plus  # noqa: E402

SEQ = 6


def _identity(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y = f(z)`` with the identity rule: ``z · (f(z) / z)`` with the ratio a constant."""
    return z * (y / z).detach()


def _gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def _mix(h: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
    shifted = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)  # the previous token, zero first
    w = weight.double().reshape(1, 1, -1)
    return h * w + shifted * (1 - w)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.double().T


def time_mix_reference(att: nn.Module, h: torch.Tensor) -> torch.Tensor:
    n = h.shape[1]
    k = _linear(att.key, _mix(h, att.time_mix_key))[0]  # (n, C)
    v = _linear(att.value, _mix(h, att.time_mix_value))[0]
    zr = _linear(att.receptance, _mix(h, att.time_mix_receptance))
    r = _identity(zr, torch.sigmoid(zr))[0]
    w, u = -att.time_decay.double().exp(), att.time_first.double()
    t, i = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = k[None, :, :] + ((t - 1 - i).clamp(min=0)[..., None] * w)  # (t, i, C)
    scores = torch.where((i == t)[..., None], (u + k)[None, :, :], scores)
    scores = scores.masked_fill((i > t)[..., None], float("-inf"))
    weights = scores.softmax(1).detach()  # the attention weights are constants
    wkv = torch.einsum("tic,ic->tc", weights, v)
    return _linear(att.output, _gate(r, wkv))[None]


def channel_mix_reference(ffn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    zk = _linear(ffn.key, _mix(h, ffn.time_mix_key))
    k = _identity(zk, torch.relu(zk) ** 2)
    zr = _linear(ffn.receptance, _mix(h, ffn.time_mix_receptance))
    r = _identity(zr, torch.sigmoid(zr))
    return _gate(r, _linear(ffn.value, k))


class Probe(nn.Module):
    """One RWKV mixer between flat features ``(1, n·d)`` and a linear read-out of its last token."""

    def __init__(self, mixer: nn.Module, d: int) -> None:
        super().__init__()
        self.mixer, self.d = mixer, d
        self.readout = nn.Linear(d, 3, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.mixer(x.view(x.shape[0], -1, self.d))
        return self.readout(y[:, -1])


def _check(mixer: nn.Module, d: int, reference) -> None:  # type: ignore[no-untyped-def]
    """``mixer`` alone, explained through :class:`Probe`, equals ``reference``."""
    torch.manual_seed(0)
    probe = Probe(mixer, d).eval()
    h = torch.randn(1, SEQ, d, dtype=torch.float64)
    x = h.detach().clone().requires_grad_(True)
    logits = reference(mixer, x)[0, -1] @ probe.readout.weight.T
    target = int(logits.argmax())
    (grad,) = torch.autograd.grad(logits[target], x)
    expected = (x * grad).detach().reshape(SEQ, d).sum(-1)
    with torch.no_grad():  # the reference's forward is the module's
        torch.testing.assert_close(probe(h.reshape(1, -1))[0], logits.detach(), rtol=1e-6, atol=1e-9)
    got = lxt_plus.explain(probe, h.reshape(1, -1), target=target, rules="ah-lrp")
    rel = got.relevance.reshape(SEQ, d).sum(-1).double()
    torch.testing.assert_close(rel, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    # not vacuous: plain gradients differ
    plain = lxt_plus.explain(probe, h.reshape(1, -1), target=target, rules="gradient", strict=False)
    gap = (plain.relevance.reshape(SEQ, d).sum(-1).double() - expected).abs().max()
    assert float(gap) > 1e-2 * float(expected.abs().max())


def _model() -> nn.Module:
    model = zoo.build("rwkv", "causal-lm")
    zoo._reinitialise(model, 3)  # non-zero mixing weights, decays and biases
    return model.double()


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The conservative rule: the centring is linear, the scale a constant."""
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps).detach()
    return centred * scale * norm.weight.double() + norm.bias.double()


def model_reference(model: nn.Module, emb: torch.Tensor) -> torch.Tensor:
    """The whole RWKV model on its token embeddings, with every rule's detaches: the logits."""
    h = emb
    for block in model.rwkv.blocks:
        if block.layer_id == 0:
            h = _layer_norm(block.pre_ln, h)
        h = h + time_mix_reference(block.attention, _layer_norm(block.ln1, h))
        h = h + channel_mix_reference(block.feed_forward, _layer_norm(block.ln2, h))
    return _linear(model.head, _layer_norm(model.rwkv.ln_out, h))


def test_the_model_equals_the_float64_reference() -> None:
    """Through the model, so the rules the patch installs are the ones checked (the receptance
    gate inside the time mixing is ruled by the patch-time operation check)."""
    model = _model()
    ids = torch.tensor([[5, 17, 9, 33, 21, 40]])
    with torch.no_grad():  # first: an eval forward rescales RWKV's layers in place, once
        out = model(ids).logits[0, -1]
    emb = model.rwkv.embeddings(ids).detach().double().requires_grad_(True)
    logits = model_reference(model, emb)[0, -1]
    # transformers' CPU WKV loop runs its exponentials in float32 (``key.float()``), even in a
    # float64 model: hence float32 tolerances below
    torch.testing.assert_close(out, logits.detach(), rtol=1e-5, atol=1e-7)
    target = int(logits.argmax())
    (grad,) = torch.autograd.grad(logits[target], emb)
    expected = (emb * grad).detach()[0].sum(-1)
    got = lxt_plus.explain(model, ids, target=target, rules="ah-lrp").relevance.double().reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    plain = lxt_plus.explain(model, ids, target=target, rules="gradient").relevance.double().reshape(-1)
    assert float((plain - expected).abs().max()) > 1e-2 * float(expected.abs().max())  # not vacuous


def test_channel_mixing_equals_the_float64_reference() -> None:
    model = _model()
    _check(model.rwkv.blocks[1].feed_forward, model.config.hidden_size, channel_mix_reference)


def test_rwkv_conserves_and_attnlrp_is_refused_by_name() -> None:
    model = _model()
    ids = torch.tensor([[5, 17, 9, 33, 21, 40]])
    c = lxt_plus.explain(model, ids, rules="conservative-check").conservation
    assert abs(float(c["absorbed"])) <= 1e-9 * abs(float(c["target_logit"]))
    try:
        lxt_plus.explain(model, ids, rules="attnlrp")
    except lxt_plus.errors.UnsupportedModelError as exc:
        assert "exp in rwkv.blocks.0.attention (RwkvSelfAttention" in str(exc)
    else:
        raise AssertionError("AttnLRP has no rule for the WKV weights' exp and must refuse it")
