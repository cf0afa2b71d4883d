"""Scans whose parameters share a projection with their input (gated DeltaNet, Mamba2's SSD)
against an independent float64 reference.

MambaLRP's principle (Jafari et al. 2024), applied to these scans: the scan's input-dependent
parameters are constants (DeltaNet's ``q``, ``k``, ``β`` and decay ``g``; Mamba2's ``B``, ``C``
and ``Δ``), so the output is linear in the values; SiLU is ``x · sigmoid(x).detach()``; the output
gate ``y · silu(z)`` is split half and half; the gated RMSNorm's scale is a constant. The reference
re-implements the mixer from its weights, with the *recurrent* form of the gated delta rule (one
step per token), where transformers runs the chunked form; read as Gradient×Input.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, "tests")
import families  # noqa: E402
import zoo  # noqa: E402

import lxt_plus  # noqa: E402

SEQ = 6


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x).detach()


def _gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def _gated_rms(norm: nn.Module, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    scale = torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
    return _gate(y * scale * norm.weight.double(), _silu(z))


def _causal_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of ``x`` ``(b, channels, n)``."""
    n = x.shape[-1]
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv1d(x, conv.weight.double(), bias, padding=conv.kernel_size[0] - 1, groups=conv.groups)[
        ..., :n
    ]


def deltanet_reference(mix: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next's gated DeltaNet mixer on ``h`` ``(1, n, d)`` in float64, with the rule's detaches."""
    n = h.shape[1]
    qkvz = h @ mix.in_proj_qkvz.weight.double().T
    ba = h @ mix.in_proj_ba.weight.double().T
    # the module's own layout of the fused projections (indexing only)
    q, k, v, z, b, a = mix.fix_query_key_value_ordering(qkvz, ba)
    mixed = torch.cat([t.reshape(1, n, -1) for t in (q, k, v)], -1).transpose(1, 2)
    mixed = _silu(_causal_conv(mix.conv1d, mixed)).transpose(1, 2)
    q, k, v = torch.split(mixed, [mix.key_dim, mix.key_dim, mix.value_dim], -1)
    q, k = q.detach(), k.detach()  # the scan's parameters are constants
    heads_v, dk, dv = mix.num_v_heads, mix.head_k_dim, mix.head_v_dim
    q = q.reshape(n, mix.num_k_heads, dk).repeat_interleave(heads_v // mix.num_k_heads, 1)
    k = k.reshape(n, mix.num_k_heads, dk).repeat_interleave(heads_v // mix.num_k_heads, 1)
    v = v.reshape(n, heads_v, dv)
    beta = torch.sigmoid(b.reshape(n, heads_v)).detach()
    decay = (-mix.A_log.double().exp() * F.softplus(a.reshape(n, heads_v) + mix.dt_bias.double())).detach()
    q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) / dk**0.5
    k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    state = torch.zeros(heads_v, dk, dv, dtype=torch.float64)
    outs = []
    for t in range(n):  # S ← e^g S;  S ← S + k (β (v − kᵀS));  o = qᵀ S
        state = state * decay[t].exp()[:, None, None]
        delta = beta[t][:, None] * (v[t] - torch.einsum("hk,hkv->hv", k[t], state))
        state = state + k[t][:, :, None] * delta[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], state))
    y = torch.stack(outs)  # (n, heads_v, dv)
    y = _gated_rms(mix.norm, y.reshape(-1, dv), z.reshape(-1, dv)).reshape(1, n, -1)
    return y @ mix.out_proj.weight.double().T


def mamba2_reference(mix: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Zamba2's Mamba2 mixer on ``h`` ``(1, n, d)`` in float64, recurrent form, with the rule's
    detaches: ``B``, ``C`` and ``Δ`` are constants."""
    n = h.shape[1]
    proj = h @ mix.in_proj.weight.double().T
    gate, xbc, dt = proj.split([mix.intermediate_size, mix.conv_dim, mix.num_heads], -1)
    xbc = _silu(_causal_conv(mix.conv1d, xbc.transpose(1, 2))).transpose(1, 2)
    groups, state_size = mix.n_groups, mix.ssm_state_size
    x, B, C = torch.split(xbc, [mix.intermediate_size, groups * state_size, groups * state_size], -1)
    B, C = B.detach().reshape(n, groups, state_size), C.detach().reshape(n, groups, state_size)
    low, high = mix.time_step_limit
    dt = F.softplus(dt[0] + mix.dt_bias.double()).clamp(low, high).detach()  # (n, heads)
    heads, p = mix.num_heads, mix.head_dim
    per_group = heads // groups
    x = x.reshape(n, heads, p)
    A = -mix.A_log.double().exp()
    state = torch.zeros(heads, p, state_size, dtype=torch.float64)
    outs = []
    for t in range(n):  # S ← e^{Δ A} S + Δ x Bᵀ;  y = S C + D x
        b = B[t].repeat_interleave(per_group, 0)  # (heads, N)
        c = C[t].repeat_interleave(per_group, 0)
        state = (dt[t] * A).exp()[:, None, None] * state + (dt[t][:, None] * x[t])[:, :, None] * b[:, None, :]
        outs.append(torch.einsum("hpn,hn->hp", state, c) + mix.D.double()[:, None] * x[t])
    y = torch.stack(outs).reshape(1, n, -1)
    # gated RMSNorm, gate first (norm_before_gate=False), normalised per group of channels
    g = _gate(y, _silu(gate))
    size = mix.norm.group_size
    grouped = g.reshape(1, n, -1, size)
    scale = torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + mix.norm.variance_epsilon).detach()
    y = (grouped * scale).reshape(1, n, -1) * mix.norm.weight.double()
    bias = None if mix.out_proj.bias is None else mix.out_proj.bias.double()
    return F.linear(y, mix.out_proj.weight.double(), bias)


class MixerProbe(nn.Module):
    """One mixer between flat features ``(batch, n·d)`` and a linear read-out of its last token."""

    def __init__(self, mixer: nn.Module, d: int) -> None:
        super().__init__()
        self.mixer, self.d = mixer, d
        self.readout = nn.Linear(d, 3, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mixer(x.view(x.shape[0], -1, self.d))
        return self.readout(y[:, -1])


def _deltanet() -> tuple[nn.Module, int]:
    model = families.randomize_biases_and_norms(zoo.build("qwen3_next", "causal-lm").double(), seed=3)
    layer = next(layer for layer in model.model.layers if hasattr(layer, "linear_attn"))
    return layer.linear_attn, model.config.hidden_size


def _mamba2() -> tuple[nn.Module, int]:
    model = families.randomize_biases_and_norms(zoo.build("zamba2", "causal-lm").double(), seed=5)
    return model.model.layers[0].mamba, model.config.hidden_size


@pytest.mark.parametrize(
    ("make", "reference"),
    [(_deltanet, deltanet_reference), (_mamba2, mamba2_reference)],
    ids=["deltanet", "mamba2"],
)
def test_scan_equals_the_float64_reference(make, reference) -> None:  # type: ignore[no-untyped-def]
    mix, d = make()
    torch.manual_seed(0)
    probe = MixerProbe(mix, d).eval()
    h = torch.randn(1, SEQ, d, dtype=torch.float64)
    x = h.detach().clone().requires_grad_(True)
    logits = reference(mix, x)[0, -1] @ probe.readout.weight.T
    target = int(logits.argmax())
    (grad,) = torch.autograd.grad(logits[target], x)
    expected = (x * grad).detach().reshape(SEQ, d).sum(-1)
    with torch.no_grad():  # the reference's forward is the module's
        torch.testing.assert_close(probe(h.reshape(1, -1))[0], logits.detach(), rtol=1e-5, atol=1e-7)
    got = lxt_plus.explain(probe, h.reshape(1, -1), target=target, rules="attnlrp", strict=False)
    rel = got.relevance.reshape(SEQ, d).sum(-1).double()
    torch.testing.assert_close(rel, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # not vacuous: plain gradients differ
    plain = lxt_plus.explain(probe, h.reshape(1, -1), target=target, rules="gradient", strict=False)
    gap = (plain.relevance.reshape(SEQ, d).sum(-1).double() - expected).abs().max()
    assert float(gap) > 1e-2 * float(expected.abs().max())


@pytest.mark.parametrize(
    "model_type", ["qwen3_next", "qwen3_5_text", "olmo_hybrid", "zamba2", "kimi_linear", "bailing_hybrid"]
)
def test_hybrid_scans_conserve_with_biases_zeroed(model_type: str) -> None:
    model = families.randomize_biases_and_norms(zoo.build(model_type, "causal-lm"), seed=4)
    ids = torch.tensor([[5, 17, 9, 33, 21, 40]])
    with lxt_plus.patched(model, "conservative-check") as handle:
        assert any(e.role == "ssm" and e.rule.name == "mamba-lrp" for e in handle.plan.entries)
    c = lxt_plus.explain(model, ids, rules="conservative-check").conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))
