"""Whole tiny models against an independent float64 LRP reference written from the papers.

The reference re-implements the forward pass of tiny Llama (rotary, RMSNorm, SwiGLU, GQA), GPT-2
(LayerNorm, GELU-new, learned positions, Conv1D) and BERT (post-LN, GELU, token-type and position
embeddings, tanh pooler, classifier) from their weights alone: it calls neither the HF forward nor
any lxt_plus code. Every operation records an explicit relevance message, and one sweep over the
recorded operations in reverse order propagates relevance from the target logit to the
embeddings:

- linear map ``z = x W + b`` (LRP-0, Bach et al. 2015): ``R(x_i) = Σ_j x_i W_ij R(z_j) / z_j``;
  the bias absorbs its share;
- addition ``s = a + b`` (residuals, embedding sums; ε-rule on addition): ``R(a) = a/s · R(s)``;
- element-wise activation (identity rule, Achtibat et al. 2024): ``R(x) = R(f(x))``;
- LayerNorm / RMSNorm (conservative rule, Ali et al. 2022): σ held constant, LRP-0 through the
  linear map ``M = C·diag(w)/σ`` (``C`` the centering matrix; ``C = I`` for RMSNorm);
- gated product ``a·u`` (uniform rule, Achtibat et al. 2024 Prop. 3.3): half of ``R`` to each;
- attention, AH-LRP (Ali et al. 2022): weights ``A`` constant, ``R(v_jd) = Σ_i A_ij v_jd R(o_id)/o_id``;
- attention, AttnLRP (Achtibat et al. 2024): uniform rule on ``A·V`` and ``Q·Kᵀ``, softmax rule
  ``R(s_i) = s_i (R(A_i) - A_i Σ_j R(A_j))`` (Prop. 3.1);
- index operations (head split/merge, GQA sharing, row selection): relevance is moved, and summed
  where one value is used several times.

``gradient`` is plain Gradient×Input, computed with autograd on the same float64 re-implementation.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lxt_plus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

DTYPE = torch.float64
RTOL = 1e-5


# =============================================================================== the relevance tape
def share(r: Tensor, z: Tensor) -> Tensor:
    """``R(z) / z``, the relevance per unit of ``z`` that each contribution to ``z`` receives; ``0``
    where ``R(z) = 0`` (nothing to distribute, also when ``z = 0``, e.g. a zero padding embedding)."""
    return torch.where(r == 0, torch.zeros_like(r), r / z)


@dataclass(eq=False)
class Node:
    """A value of the reference forward pass and the relevance it receives in the backward sweep."""

    value: Tensor
    relevance: Tensor | None = None

    def receive(self, r: Tensor) -> None:
        self.relevance = r if self.relevance is None else self.relevance + r


@dataclass
class Tape:
    """Records the forward pass; :meth:`propagate` sends relevance back through every message.

    ``attention_rule`` is ``"ah-lrp"`` or ``"attnlrp"``; ``positional`` makes rotary angles inputs
    (PA-LRP, Bakish et al. 2025). With ``gradient`` the leaves
    require grad, so the values carry autograd graphs for the Gradient×Input reference; relevance
    messages only ever use detached values. ``hf_float32`` reproduces the float32 arithmetic that
    transformers' Llama code uses in every dtype (RMSNorm normalisation, rotary angles); without
    it the reference is float64 throughout.
    """

    attention_rule: str = "attnlrp"
    gradient: bool = False
    hf_float32: bool = True
    positional: bool = False
    messages: list[Callable[[], None]] = field(default_factory=list)

    # ------------------------------------------------------------------------------- sweep
    def propagate(self, target: Node) -> None:
        """Start from ``R(target) = target`` and apply the messages in reverse order."""
        target.relevance = target.value.detach().clone()
        for message in reversed(self.messages):
            message()

    def _record(self, out: Node, message: Callable[[Tensor], None]) -> Node:
        def run() -> None:
            if out.relevance is not None:
                message(out.relevance)

        self.messages.append(run)
        return out

    # ------------------------------------------------------------------------------- operations
    def leaf(self, value: Tensor) -> Node:
        """An embedding output: where input relevance is read."""
        return Node(value.detach().clone().requires_grad_(self.gradient))

    def linear(self, x: Node, weight: Tensor, bias: Tensor | None) -> Node:
        """``z = x W + b`` with ``W`` of shape ``(in, out)``; LRP-0: ``R(x_i) = Σ_j x_i W_ij R(z_j)/z_j``."""
        z = x.value @ weight + (0.0 if bias is None else bias)
        out = Node(z)
        xv, zv = x.value.detach(), z.detach()
        return self._record(out, lambda r: x.receive(torch.einsum("ni,ij,nj->ni", xv, weight, share(r, zv))))

    def add(self, a: Node, b: Node) -> Node:
        """``s = a + b``; ε-rule on addition (ε→0): ``R(a) = a/s · R(s)``, ``R(b) = b/s · R(s)``."""
        s = a.value + b.value
        out = Node(s)
        av, bv, sv = a.value.detach(), b.value.detach(), s.detach()

        def message(r: Tensor) -> None:
            a.receive(av * share(r, sv))
            b.receive(bv * share(r, sv))

        return self._record(out, message)

    def activation(self, x: Node, fn: Callable[[Tensor], Tensor]) -> Node:
        """``y = f(x)`` element-wise; identity rule: ``R(x) = R(y)``."""
        return self._record(Node(fn(x.value)), x.receive)

    def product(self, a: Node, b: Node) -> Node:
        """``y = a ⊙ b`` of two input-dependent factors; uniform rule: ``R(a) = R(b) = R(y)/2``."""

        def message(r: Tensor) -> None:
            a.receive(0.5 * r)
            b.receive(0.5 * r)

        return self._record(Node(a.value * b.value), message)

    def layer_norm(
        self, x: Node, weight: Tensor, bias: Tensor | None, eps: float, centred: bool = True
    ) -> Node:
        """LayerNorm (``centred``) or RMSNorm over the last dim, with the conservative rule.

        With ``σ`` (the std, or the RMS) held constant, ``y_k = Σ_i x_i M_ik + b_k`` with
        ``M = C·diag(w)/σ``, ``C = I - 11ᵀ/d`` (``C = I`` for RMSNorm); then LRP-0 through ``M``:
        ``R(x_i) = Σ_k x_i M_ik R(y_k) / y_k``.
        """
        xv = x.value
        shifted = xv - xv.mean(-1, keepdim=True) if centred else xv
        inv_sigma = torch.rsqrt(shifted.pow(2).mean(-1, keepdim=True) + eps)
        y = shifted * inv_sigma * weight + (0.0 if bias is None else bias)
        return self._norm_message(x, Node(y), weight, inv_sigma, centred)

    def llama_rms_norm(self, x: Node, weight: Tensor, eps: float) -> Node:
        """Llama's RMSNorm as transformers computes it: the normalisation runs in float32 whatever the
        model's dtype (``w · (x₃₂ · rsqrt(mean(x₃₂²) + eps))``), then the conservative rule as above."""
        if not self.hf_float32:
            return self.layer_norm(x, weight, None, eps, centred=False)
        x32 = x.value.to(torch.float32)
        inv_sigma = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * inv_sigma).to(DTYPE)
        return self._norm_message(x, Node(y), weight, inv_sigma.to(DTYPE), centred=False)

    def _norm_message(self, x: Node, out: Node, weight: Tensor, inv_sigma: Tensor, centred: bool) -> Node:
        d = x.value.shape[-1]
        centering = torch.eye(d, dtype=DTYPE) - (1.0 / d if centred else 0.0)
        # one (d, d) matrix per row: M[n] = C diag(w) / σ_n
        matrices = (centering * weight)[None] * inv_sigma.detach()[..., None]
        xd, yd = x.value.detach(), out.value.detach()
        return self._record(
            out, lambda r: x.receive(torch.einsum("ni,nik,nk->ni", xd, matrices, share(r, yd)))
        )

    def rearrange(self, x: Node, index_fn: Callable[[Tensor], Tensor]) -> Node:
        """Any indexing op (reshape, transpose, slice, repeat, select), given as a function applied
        to a tensor of flat positions. Relevance goes back to where each value came from, summed
        over repeated uses."""
        flat = torch.arange(x.value.numel()).reshape(x.value.shape)
        index = index_fn(flat)
        out = Node(x.value.reshape(-1)[index])

        def message(r: Tensor) -> None:
            back = torch.zeros(x.value.numel(), dtype=DTYPE)
            back.index_add_(0, index.reshape(-1), r.reshape(-1))
            x.receive(back.reshape(x.value.shape))

        return self._record(out, message)

    def rotary(self, x: Node, cos: Tensor, sin: Tensor, positions: Node | None = None) -> Node:
        """Rotary embedding of ``x`` ``(heads, seq, dh)``: per position ``t`` the linear map
        ``y_t = x_t P_t`` with ``P_t[i, j] = δ_ij cos_tj + H_ij sin_tj`` (``H`` rotates the two halves:
        ``(x1, x2) ↦ (-x2, x1)``); LRP-0 through ``P_t``.

        With ``positional`` (PA-LRP) the angles are inputs: ``y = x ⊙ cos + (x H) ⊙ sin``, the
        ε-rule on the sum gives each term ``term/y · R(y)``, and the uniform rule on each product
        gives half of that to ``x`` (through ``H`` for the second term) and half to the position,
        which ``positions`` ``(seq,)`` collects over heads and dimensions."""
        dh = x.value.shape[-1]
        half = dh // 2
        rot = torch.zeros(dh, dh, dtype=DTYPE)
        for j in range(half):
            rot[j + half, j] = -1.0
            rot[j, j + half] = 1.0
        maps = torch.diag_embed(cos) + rot[None] * sin[:, None, :]  # (seq, dh, dh)
        y = torch.einsum("hti,tij->htj", x.value, maps)
        out = Node(y)
        xv, yv = x.value.detach(), y.detach()
        if not self.positional:
            return self._record(
                out, lambda r: x.receive(torch.einsum("hti,tij,htj->hti", xv, maps, share(r, yv)))
            )
        assert positions is not None
        rotated = xv @ rot  # (x H)_j

        def message(r: Tensor) -> None:
            first = xv * cos * share(r, yv)  # R of x ⊙ cos
            second = rotated * sin * share(r, yv)  # R of (x H) ⊙ sin
            x.receive(0.5 * first + 0.5 * torch.einsum("htj,ij->hti", second, rot.abs()))
            positions.receive(0.5 * (first + second).sum(dim=(0, 2)))

        return self._record(out, message)

    def attention(self, q: Node, k: Node, v: Node, allowed: Tensor, scale: float) -> Node:
        """``o = softmax(scale·q kᵀ + mask) v`` per head; ``k``/``v`` may have fewer heads (GQA).

        AH-LRP: ``A`` constant, so ``R(v_jd) = Σ_i A_ij v_jd R(o_id) / o_id`` and ``q``, ``k`` get nothing.
        AttnLRP: each product ``A_ij v_jd`` gets ``A_ij v_jd R(o_id)/o_id``, split ½/½ between ``A_ij`` and
        ``v_jd``; softmax rule ``R(s_ij) = s_ij (R(A_ij) - A_ij Σ_j' R(A_ij'))`` over the allowed keys;
        ``s_ij = scale Σ_d q_id k_jd``: each product ``q_id k_jd`` gets ``q_id k_jd R(s_ij) / (q_i·k_j)``,
        split ½/½ between ``q_id`` and ``k_jd``.
        """
        heads, kv_heads = q.value.shape[0], k.value.shape[0]
        group = heads // kv_heads
        kh = k.value.repeat_interleave(group, 0)
        vh = v.value.repeat_interleave(group, 0)
        dot = q.value @ kh.transpose(-1, -2)
        scores = (scale * dot).masked_fill(~allowed, -math.inf)
        att = torch.softmax(scores, dim=-1)
        o = att @ vh
        out = Node(o)
        qd, kd, vd, od, ad, dd = (t.detach() for t in (q.value, kh, vh, o, att, dot))
        sd = scores.detach().masked_fill(~allowed, 0.0)

        def fold(r: Tensor) -> Tensor:  # relevance of the repeated k/v heads summed per kv head
            return r.reshape(kv_heads, group, *r.shape[1:]).sum(1)

        def message(r: Tensor) -> None:
            r_prod = torch.einsum("hij,hjd,hid->hijd", ad, vd, share(r, od))  # R(A_ij v_jd)
            if self.attention_rule == "ah-lrp":
                v.receive(fold(r_prod.sum(1)))
                return
            v.receive(fold(0.5 * r_prod.sum(1)))
            r_att = 0.5 * r_prod.sum(-1)
            r_scores = sd * (r_att - ad * r_att.sum(-1, keepdim=True))
            r_qk = torch.einsum("hid,hjd,hij->hijd", qd, kd, share(r_scores, dd))  # R(q_id k_jd)
            q.receive(0.5 * r_qk.sum(2))
            k.receive(fold(0.5 * r_qk.sum(1)))

        return self._record(out, message)


# =============================================================================== reference models
def weight_of(module: nn.Module) -> Tensor:
    """The module's weight, read as a float64 constant."""
    return module.weight.detach().to(DTYPE)


def bias_of(module: nn.Module, zero_bias: bool) -> Tensor | None:
    """The module's bias (zeros for the ``conservative-check`` preset), or ``None``."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    return torch.zeros_like(bias, dtype=DTYPE) if zero_bias else bias.detach().to(DTYPE)


def gelu_erf(x: Tensor) -> Tensor:
    """``x Φ(x)`` (BERT's ``gelu``)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: Tensor) -> Tensor:
    """``½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))`` (GPT-2's ``gelu_new``)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def split_heads(n: int, heads: int, dh: int, start: int = 0) -> Callable[[Tensor], Tensor]:
    """Columns ``start : start + heads·dh`` of an ``(n, ·)`` tensor as ``(heads, n, dh)``."""
    return lambda t: t[:, start : start + heads * dh].reshape(n, heads, dh).transpose(0, 1)


def merge_heads(t: Tensor) -> Tensor:
    """``(heads, n, dh)`` → ``(n, heads·dh)``."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


@dataclass
class Reference:
    """One row of the reference: the target logit and the embedding nodes it was computed from."""

    tape: Tape
    target: Node
    tokens: Node
    extras: list[Node]
    # the position encoding's node: an added table (seq, d), or rotary angles' sink (seq,)
    positions: Node | None = None

    def positional(self) -> Tensor | None:
        """Relevance per position, after :meth:`relevance`; ``None`` without a position node."""
        if self.positions is None:
            return None
        r = self.positions.relevance
        r = torch.zeros_like(self.positions.value) if r is None else r
        return r.sum(-1) if r.dim() == 2 else r

    def relevance(self) -> tuple[Tensor, Tensor | None]:
        """LRP relevance per token ``(seq,)`` and total relevance on position/type embeddings."""
        self.tape.propagate(self.target)
        return _summed(self.tokens, self.extras, lambda node: node.relevance)


def _summed(
    tokens: Node, extras: list[Node], get: Callable[[Node], Tensor | None]
) -> tuple[Tensor, Tensor | None]:
    def value(node: Node) -> Tensor:
        r = get(node)
        return torch.zeros_like(node.value) if r is None else r

    token_rel = value(tokens).sum(-1)
    extra = sum(value(e).sum() for e in extras) if extras else None
    return token_rel, extra  # type: ignore[return-value]


def llama_reference(
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    target: tuple[int, int],
    tape: Tape,
    zero_bias: bool = False,
    embed: Callable[[Node], Node] | None = None,
) -> Reference:
    """Tiny Llama: RMSNorm, rotary positions, GQA, SwiGLU MLP, untied LM head; ``target = (pos, token)``.
    ``embed`` turns the token-embedding node into the first hidden state (a vision-language model
    puts its image features there)."""
    cfg = model.config
    core = model.model
    n = ids.shape[0]
    heads, kv_heads, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    # rotary angles t·θ^(-2i/dh); transformers computes them (and cos, sin) in float32 in any dtype
    angle_dtype = torch.float32 if tape.hf_float32 else DTYPE
    positions = (mask.cumsum(0) - 1).clamp(min=0).to(angle_dtype)
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dh, 2, dtype=angle_dtype) / dh))
    angles = torch.cat([positions[:, None] * inv_freq[None]] * 2, -1)
    cos, sin = angles.cos().to(DTYPE), angles.sin().to(DTYPE)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & mask.bool()[None, :]

    tokens = tape.leaf(weight_of(core.embed_tokens)[ids])
    angles_sink = Node(torch.zeros(n, dtype=DTYPE))
    h = tokens if embed is None else embed(tokens)
    for layer in core.layers:
        attn, mlp = layer.self_attn, layer.mlp
        a = tape.llama_rms_norm(h, weight_of(layer.input_layernorm), layer.input_layernorm.variance_epsilon)
        q = tape.linear(a, weight_of(attn.q_proj).T, bias_of(attn.q_proj, zero_bias))
        k = tape.linear(a, weight_of(attn.k_proj).T, bias_of(attn.k_proj, zero_bias))
        v = tape.linear(a, weight_of(attn.v_proj).T, bias_of(attn.v_proj, zero_bias))
        q = tape.rotary(tape.rearrange(q, split_heads(n, heads, dh)), cos, sin, angles_sink)
        k = tape.rotary(tape.rearrange(k, split_heads(n, kv_heads, dh)), cos, sin, angles_sink)
        v = tape.rearrange(v, split_heads(n, kv_heads, dh))
        o = tape.rearrange(tape.attention(q, k, v, allowed, dh**-0.5), merge_heads)
        h = tape.add(h, tape.linear(o, weight_of(attn.o_proj).T, bias_of(attn.o_proj, zero_bias)))
        b = tape.llama_rms_norm(
            h, weight_of(layer.post_attention_layernorm), layer.post_attention_layernorm.variance_epsilon
        )
        gate = tape.activation(tape.linear(b, weight_of(mlp.gate_proj).T, None), silu)
        up = tape.linear(b, weight_of(mlp.up_proj).T, None)
        h = tape.add(h, tape.linear(tape.product(gate, up), weight_of(mlp.down_proj).T, None))
    f = tape.llama_rms_norm(h, weight_of(core.norm), core.norm.variance_epsilon)
    pos, token = target
    last = tape.rearrange(f, lambda t: t[pos : pos + 1])
    logits = tape.linear(last, weight_of(model.lm_head).T, None)
    return Reference(tape, tape.rearrange(logits, lambda t: t[0, token]), tokens, [], angles_sink)


def gpt2_reference(
    model: nn.Module, ids: Tensor, mask: Tensor, target: tuple[int, int], tape: Tape, zero_bias: bool = False
) -> Reference:
    """Tiny GPT-2: learned positions, pre-LN, Conv1D projections (weight ``(in, out)``), GELU-new,
    LM head tied to the token embeddings; ``target = (pos, token)``."""
    core = model.transformer
    n = ids.shape[0]
    heads = model.config.n_head
    d = model.config.n_embd
    dh = d // heads
    positions = (mask.cumsum(0) - 1).clamp(min=0)
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & mask.bool()[None, :]

    tokens = tape.leaf(weight_of(core.wte)[ids])
    pos_emb = tape.leaf(weight_of(core.wpe)[positions])
    h = tape.add(tokens, pos_emb)
    for block in core.h:
        ln1, ln2, attn, mlp = block.ln_1, block.ln_2, block.attn, block.mlp
        a = tape.layer_norm(h, weight_of(ln1), bias_of(ln1, zero_bias), ln1.eps)
        qkv = tape.linear(a, weight_of(attn.c_attn), bias_of(attn.c_attn, zero_bias))
        q = tape.rearrange(qkv, split_heads(n, heads, dh, 0))
        k = tape.rearrange(qkv, split_heads(n, heads, dh, d))
        v = tape.rearrange(qkv, split_heads(n, heads, dh, 2 * d))
        o = tape.rearrange(tape.attention(q, k, v, allowed, dh**-0.5), merge_heads)
        h = tape.add(h, tape.linear(o, weight_of(attn.c_proj), bias_of(attn.c_proj, zero_bias)))
        c = tape.layer_norm(h, weight_of(ln2), bias_of(ln2, zero_bias), ln2.eps)
        f = tape.activation(tape.linear(c, weight_of(mlp.c_fc), bias_of(mlp.c_fc, zero_bias)), gelu_tanh)
        h = tape.add(h, tape.linear(f, weight_of(mlp.c_proj), bias_of(mlp.c_proj, zero_bias)))
    f = tape.layer_norm(h, weight_of(core.ln_f), bias_of(core.ln_f, zero_bias), core.ln_f.eps)
    pos, token = target
    last = tape.rearrange(f, lambda t: t[pos : pos + 1])
    logits = tape.linear(last, weight_of(model.lm_head).T, None)
    return Reference(tape, tape.rearrange(logits, lambda t: t[0, token]), tokens, [pos_emb], pos_emb)


def bert_reference(
    model: nn.Module, ids: Tensor, mask: Tensor, target: tuple[int, int], tape: Tape, zero_bias: bool = False
) -> Reference:
    """Tiny BERT classifier: word + token-type + position embeddings, post-LN layers, GELU, tanh
    pooler on the first token, linear classifier; ``target = (_, class)``."""
    bert = model.bert
    emb = bert.embeddings
    n = ids.shape[0]
    heads = model.config.num_attention_heads
    dh = model.config.hidden_size // heads
    allowed = mask.bool()[None, :].expand(n, n)

    tokens = tape.leaf(weight_of(emb.word_embeddings)[ids])
    types = tape.leaf(weight_of(emb.token_type_embeddings)[torch.zeros(n, dtype=torch.long)])
    pos_emb = tape.leaf(weight_of(emb.position_embeddings)[torch.arange(n)])
    e = tape.add(tape.add(tokens, types), pos_emb)
    x = tape.layer_norm(e, weight_of(emb.LayerNorm), bias_of(emb.LayerNorm, zero_bias), emb.LayerNorm.eps)
    for layer in bert.encoder.layer:
        sa, so = layer.attention.self, layer.attention.output
        q = tape.rearrange(
            tape.linear(x, weight_of(sa.query).T, bias_of(sa.query, zero_bias)), split_heads(n, heads, dh)
        )
        k = tape.rearrange(
            tape.linear(x, weight_of(sa.key).T, bias_of(sa.key, zero_bias)), split_heads(n, heads, dh)
        )
        v = tape.rearrange(
            tape.linear(x, weight_of(sa.value).T, bias_of(sa.value, zero_bias)), split_heads(n, heads, dh)
        )
        o = tape.rearrange(tape.attention(q, k, v, allowed, dh**-0.5), merge_heads)
        s1 = tape.add(tape.linear(o, weight_of(so.dense).T, bias_of(so.dense, zero_bias)), x)
        x = tape.layer_norm(s1, weight_of(so.LayerNorm), bias_of(so.LayerNorm, zero_bias), so.LayerNorm.eps)
        inter, out = layer.intermediate.dense, layer.output
        g = tape.activation(tape.linear(x, weight_of(inter).T, bias_of(inter, zero_bias)), gelu_erf)
        s2 = tape.add(tape.linear(g, weight_of(out.dense).T, bias_of(out.dense, zero_bias)), x)
        x = tape.layer_norm(
            s2, weight_of(out.LayerNorm), bias_of(out.LayerNorm, zero_bias), out.LayerNorm.eps
        )
    first = tape.rearrange(x, lambda t: t[0:1])
    pooler = bert.pooler.dense
    pooled = tape.activation(tape.linear(first, weight_of(pooler).T, bias_of(pooler, zero_bias)), torch.tanh)
    logits = tape.linear(pooled, weight_of(model.classifier).T, bias_of(model.classifier, zero_bias))
    return Reference(
        tape, tape.rearrange(logits, lambda t: t[0, target[1]]), tokens, [types, pos_emb], pos_emb
    )


REFERENCES = {"llama": llama_reference, "gpt2": gpt2_reference, "bert": bert_reference}


# =============================================================================== running both sides
def reference_relevance(
    family: str,
    model: nn.Module,
    ids: Tensor,
    mask: Tensor,
    target: tuple[int, int],
    rules: str,
    hf_float32: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """``(token relevance (seq,), extra relevance or None, target logit, relevance per position or
    None)`` of one row. Under the positional presets the extra relevance still counts the added
    position table; :func:`compare_rows` moves it to the tokens."""
    build_ref = REFERENCES[family]
    if rules == "gradient":  # plain Gradient×Input: autograd through the float64 re-implementation
        ref = build_ref(model, ids, mask, target, Tape(gradient=True, hf_float32=hf_float32))
        leaves = [ref.tokens, *ref.extras]
        grads = torch.autograd.grad(ref.target.value, [node.value for node in leaves], allow_unused=True)
        by_node = {id(node): g for node, g in zip(leaves, grads, strict=True)}

        def grad_x_input(node: Node) -> Tensor | None:
            g = by_node[id(node)]
            return None if g is None else node.value.detach() * g

        tokens, extra = _summed(ref.tokens, ref.extras, grad_x_input)
        positions = ref.positions
        positional = None
        if positions is not None and positions.value.dim() == 2:  # an added table
            g = grad_x_input(positions)
            positional = torch.zeros(ids.shape[0], dtype=DTYPE) if g is None else g.sum(-1)
        return tokens, extra, ref.target.value.detach(), positional
    attention = "ah-lrp" if rules in ("ah-lrp", "pa-ah-lrp", "conservative-check") else "attnlrp"
    pa = rules.startswith("pa-")
    ref = build_ref(
        model,
        ids,
        mask,
        target,
        Tape(attention, hf_float32=hf_float32, positional=pa),
        zero_bias=rules == "conservative-check",
    )
    tokens, extra = ref.relevance()
    positional = ref.positional()
    if ref.positions is not None and ref.positions.value.dim() == 1 and not pa:
        positional = None  # rotary angles are constants outside the positional presets
    return tokens, extra, ref.target.value, positional


# =============================================================================== tests
FAMILIES = ["llama", "gpt2", "bert"]
PRESETS = ["ah-lrp", "attnlrp", "gradient", "conservative-check", "pa-attnlrp", "pa-ah-lrp"]
SEQ = 6
TARGET_TOKEN = 7  # any token id of the tiny vocabulary; BERT explains class 1
TARGET_CLASS = 1


def randomize_biases_and_norms(model: nn.Module, seed: int) -> nn.Module:
    """HF initialises biases to 0 and norm weights to 1; random values exercise those paths too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=DTYPE)
            if name.endswith("bias"):
                p.copy_(0.2 * noise)
            elif "norm" in name.lower() or name.split(".")[-2].startswith("ln_"):
                p.copy_(1.0 + 0.3 * noise)
    return model


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """The tiny 2-layer models of ``tests/families.py`` in float64, biases and norm weights random."""
    return {
        family: randomize_biases_and_norms(build(family).to(DTYPE), seed=10 + i)
        for i, family in enumerate(FAMILIES)
    }


def token_ids(rows: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 96, (rows, SEQ), generator=generator)


def target_for(family: str, mask_row: Tensor) -> tuple[int, int]:
    """``(position, id)``: next-token logit at the last real token, or a class for BERT."""
    last = int(mask_row.nonzero().max())
    return (last, TARGET_TOKEN) if family != "bert" else (0, TARGET_CLASS)


def atol_factor(family: str, rules: str) -> float:
    """``atol = factor · max|R|``: 1e-8, except for Llama's LRP presets.

    transformers' ``LlamaRMSNorm`` normalises in float32 in every dtype, so in a float64 model the
    gradient through each RMSNorm passes a float32 cast (its backward); the reference reproduces the
    forward values exactly, but its explicit relevance messages are not rounded. The measured gap is
    ~6e-8·max|R|; any rule error is ≥ 1e-3·max|R|. (Gradient×Input is autograd on the same casts.)
    """
    return 5e-7 if family == "llama" and rules != "gradient" else 1e-8


def assert_relevance_close(actual: Tensor, expected: Tensor, scale: float, factor: float, what: str) -> None:
    torch.testing.assert_close(
        actual.to(DTYPE), expected.to(DTYPE), rtol=RTOL, atol=factor * scale, msg=lambda m: f"{what}: {m}"
    )


def compare_rows(family: str, model: nn.Module, ids: Tensor, mask: Tensor, rules: str) -> None:
    """Explain every row with lxt_plus and compare with the reference row by row."""
    targets = [target_for(family, mask[r]) for r in range(ids.shape[0])]
    spec = [t[1] for t in targets]
    explanation = lxt_plus.explain(model, ids, target=spec, attention_mask=mask, rules=rules)
    assert explanation.batch_relevance.dtype == DTYPE
    for r in range(ids.shape[0]):
        ref_tokens, ref_extra, ref_logit, ref_positions = reference_relevance(
            family, model, ids[r], mask[r], targets[r], rules
        )
        if ref_positions is None:
            assert explanation.positional_relevance is None
        else:
            assert explanation.positional_relevance is not None
            ref_positions = ref_positions * mask[r]
            assert_relevance_close(
                explanation.positional_relevance[r],
                ref_positions,
                float(ref_tokens.abs().max()),
                atol_factor(family, rules),
                f"{family}/{rules} row {r} positions",
            )
            if rules.startswith("pa-"):  # relevance of position-token pairs
                ref_tokens = ref_tokens + ref_positions
                if ref_extra is not None:
                    ref_extra = ref_extra - ref_positions.sum()
        ref_tokens = ref_tokens * mask[r]
        scale = float(ref_tokens.abs().max())
        if ref_extra is not None:
            scale = max(scale, float(ref_extra.abs()))
        factor = atol_factor(family, rules)
        torch.testing.assert_close(explanation.target_logit[r], ref_logit.detach(), rtol=1e-10, atol=1e-12)
        assert_relevance_close(
            explanation.batch_relevance[r], ref_tokens, scale, factor, f"{family}/{rules} row {r}"
        )
        if ref_extra is None:
            assert explanation.extra_relevance is None
        else:
            assert explanation.extra_relevance is not None
            assert_relevance_close(
                explanation.extra_relevance[r],
                ref_extra.detach(),
                scale,
                factor,
                f"{family}/{rules} row {r} position/type embeddings",
            )


@pytest.mark.parametrize(
    ("family", "rules"), [pytest.param(f, r, id=f"{f}-{r}") for f in FAMILIES for r in PRESETS]
)
def test_single_sequence_matches_reference(models: dict[str, nn.Module], family: str, rules: str) -> None:
    """One unpadded sequence: token relevance and position/type-embedding relevance."""
    ids = token_ids(1, seed=1)
    compare_rows(family, models[family], ids, torch.ones_like(ids), rules)


@pytest.mark.parametrize(
    ("family", "rules"),
    [pytest.param(f, r, id=f"{f}-{r}") for f in FAMILIES for r in ("ah-lrp", "attnlrp", "pa-attnlrp")],
)
def test_padded_batch_matches_reference(models: dict[str, nn.Module], family: str, rules: str) -> None:
    """A right-padded batch: the reference masks padded keys explicitly; pad tokens get 0."""
    ids = token_ids(2, seed=2)
    mask = torch.ones_like(ids)
    mask[1, SEQ - 2 :] = 0
    ids[1, SEQ - 2 :] = 0
    compare_rows(family, models[family], ids, mask, rules)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_conservative_without_biases(models: dict[str, nn.Module], family: str) -> None:
    """The reference itself: AH-LRP with zero biases sums to the target logit (Ali et al. 2022)."""
    ids = token_ids(1, seed=1)[0]
    mask = torch.ones_like(ids)
    tokens, extra, logit, _ = reference_relevance(
        family, models[family], ids, mask, target_for(family, mask), "conservative-check", hf_float32=False
    )
    total = tokens.sum() + (0.0 if extra is None else extra)
    torch.testing.assert_close(total, logit, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_presets_differ(models: dict[str, nn.Module], family: str) -> None:
    """The comparison is not vacuous: the reference's three presets give clearly different relevance."""
    ids = token_ids(1, seed=1)[0]
    mask = torch.ones_like(ids)
    target = target_for(family, mask)
    results = {
        rules: reference_relevance(family, models[family], ids, mask, target, rules)[0]
        for rules in ("ah-lrp", "attnlrp", "gradient")
    }
    for a, b in (("ah-lrp", "attnlrp"), ("ah-lrp", "gradient"), ("attnlrp", "gradient")):
        gap = (results[a] - results[b]).abs().max() / results[a].abs().max()
        assert gap > 1e-3, f"{family}: reference {a} and {b} agree to {float(gap):.1e}"
    # PA-LRP: the positions take a share that is not small, rotary angles (Llama) only under it
    tokens, _, _, positions = reference_relevance(family, models[family], ids, mask, target, "pa-attnlrp")
    assert positions is not None
    assert float(positions.abs().max()) > 1e-2 * float(tokens.abs().max())
    if family == "llama":
        gap = (tokens - results["attnlrp"]).abs().max() / tokens.abs().max()
        assert gap > 1e-3, (
            f"llama: reference pa-attnlrp and attnlrp token relevance agree to {float(gap):.1e}"
        )
