"""MambaLRP on a Mamba model against an independent float64 reference written from the paper.

Jafari et al. 2024 (MambaLRP) make relevance conservative with three changes to the forward pass,
read as Gradient×Input: SiLU as ``x · sigmoid(x).detach()``; the selective scan's input-dependent
parameters (Δ, so Ā and B̄, and C) detached; the multiplicative gate split half and half
(``0.5 · (a·b) + 0.5 · (a·b)`` with one factor detached in each half); RMSNorm's scale detached.
The reference below re-implements the whole model from its weights with those changes.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "tests")
import families  # noqa: E402
import zoo  # noqa: E402

import lxt_plus  # noqa: E402

IDS = torch.tensor([[5, 17, 9, 33, 21, 40]])


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x).detach()


def _gate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a * b.detach()) + 0.5 * (a.detach() * b)


def _rms(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
    return x * scale * norm.weight.double()


def _mixer(mix: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    d = lambda t: None if t is None else t.double()  # noqa: E731
    n = h.shape[1]
    proj = F.linear(h, d(mix.in_proj.weight), d(mix.in_proj.bias)).transpose(1, 2)
    x, z = proj.chunk(2, dim=1)
    conv = mix.conv1d
    x = F.conv1d(x, d(conv.weight), d(conv.bias), padding=conv.padding, groups=conv.groups)[..., :n]
    x = _silu(x)  # (b, d_inner, n)
    dt, B, C = torch.split(
        F.linear(x.transpose(1, 2), d(mix.x_proj.weight)),
        [mix.time_step_rank, mix.ssm_state_size, mix.ssm_state_size],
        -1,
    )
    dt, B, C = dt.detach(), B.detach(), C.detach()  # the scan's parameters are constants
    dt = F.softplus(d(mix.dt_proj.weight) @ dt.transpose(1, 2) + d(mix.dt_proj.bias)[:, None])
    A = -torch.exp(d(mix.A_log))
    state = torch.zeros(x.shape[0], x.shape[1], A.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(n):
        a_bar = torch.exp(A * dt[:, :, t, None])
        b_bar = dt[:, :, t, None] * B[:, None, t, :]
        state = a_bar * state + b_bar * x[:, :, t, None]
        ys.append((state * C[:, None, t, :]).sum(-1))
    y = torch.stack(ys, -1) + x * d(mix.D)[None, :, None]
    y = _gate(y, _silu(z))
    return F.linear(y.transpose(1, 2), d(mix.out_proj.weight), d(mix.out_proj.bias))


def reference(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    emb = model.backbone.embeddings.weight.double()[ids].detach().requires_grad_(True)
    h = emb
    for block in model.backbone.layers:
        h = h + _mixer(block.mixer, _rms(block.norm, h))
    h = _rms(model.backbone.norm_f, h)
    logits = F.linear(h, model.lm_head.weight.double())
    target = int(logits[0, -1].argmax())
    logit = logits[0, -1, target]
    (grad,) = torch.autograd.grad(logit, emb)
    return (emb * grad).sum(-1)[0].detach(), float(logit)


def test_mamba_lrp_equals_the_float64_reference() -> None:
    model = families.randomize_biases_and_norms(zoo.build("mamba", "causal-lm"))
    expected, logit = reference(model, IDS)
    with lxt_plus.patched(model, "attnlrp") as handle:
        assert any(e.role == "ssm" and e.rule.name == "mamba-lrp" for e in handle.plan.entries)
        got = lxt_plus.explain(model, IDS, rules="attnlrp")
    assert abs(float(got.target_logit) - logit) < 1e-4 * max(1.0, abs(logit))
    torch.testing.assert_close(got.relevance[0].double(), expected, rtol=1e-4, atol=1e-6)


def test_mamba_conserves_with_biases_zeroed() -> None:
    model = families.randomize_biases_and_norms(zoo.build("mamba", "causal-lm"))
    c = lxt_plus.explain(model, IDS, rules="conservative-check").conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))
