"""Torch-function modes that apply a rule to operations written inline in a module's forward.

HF modules compute norms, gated products and some attention inline (``x * torch.rsqrt(var)``,
``act(g) * u``, ``softmax(q @ k.T)``). A mode active only while one patched module runs sees
those operations and swaps in the rule's backward pass, whatever the module's source looks like.
Modes live on a thread-local stack, so other threads and other models are not affected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lxt_plus.engine.attention import rule_mha, rule_sdpa
from lxt_plus.engine.functional import acc, identity_rule, uniform_matmul, uniform_mul

__all__ = [
    "NormMode",
    "ProductMode",
    "is_gate",
    "AttentionOpsMode",
    "ElementwiseIdentityMode",
    "SDPARuleMode",
    "RouterMode",
    "PositionalMode",
    "is_positional",
    "ScanMode",
    "scan_split",
]

# an unbound handler: (mode, torch function, args, kwargs) -> result
Handler = Callable[[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
_T = torch.Tensor
_TB = torch._C.TensorBase


def _funcs(*names: str, modules: tuple[Any, ...] = (torch, _T, _TB)) -> list[Callable[..., Any]]:
    out = []
    for mod in modules:
        for name in names:
            fn = getattr(mod, name, None)
            if fn is not None and fn not in out:
                out.append(fn)
    return out


def _both_depend_on_input(a: Any, b: Any) -> bool:
    """True when both operands are non-leaf tensors in the autograd graph (not parameters)."""
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.grad_fn is not None
        and b.grad_fn is not None
        and torch.is_grad_enabled()
    )


class _RuleMode(TorchFunctionMode):
    """Dispatches selected torch functions to handlers; everything else runs unchanged.

    A mode is made afresh for every patched forward call, so its dispatch table (torch function ->
    unbound handler) is built once per class and shared: see :meth:`_table`.
    """

    _TABLES: dict[Any, dict[Any, Handler]] = {}

    def __init__(self, *key: Any) -> None:
        super().__init__()
        table = _RuleMode._TABLES.get((type(self), key))
        if table is None:
            table = _RuleMode._TABLES[(type(self), key)] = self._table(*key)
        self.handlers = table
        self.hits = 0
        self.suspended = False

    @classmethod
    def _table(cls, *key: Any) -> dict[Any, Handler]:
        """The torch functions this mode changes, each with its (unbound) handler."""
        return {}

    @staticmethod
    def on(funcs: list[Callable[..., Any]], handler: Handler) -> dict[Any, Handler]:
        return dict.fromkeys(funcs, handler)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        handler = None if self.suspended else self.handlers.get(func)
        if handler is None:
            return func(*args, **kwargs)
        return handler(self, func, args, kwargs)

    def _count(self) -> None:
        self.hits += 1

    def _identity_rule(self, func, args, kwargs, count: bool = True):  # type: ignore[no-untyped-def]
        """The identity rule on an element-wise call ``func(x, ...)`` whose input depends on the input
        (counted as a hit with ``count``); the call unchanged otherwise."""
        x = args[0] if args else None
        if not isinstance(x, Tensor) or not x.requires_grad or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if count:
            self._count()
        return identity_rule(x, lambda t: func(t, *args[1:], **kwargs))


def _centred_constant_scale(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """``(x - mean) / std`` over ``dims`` with the std held constant (detached): the conservative
    rule's normalisation, shared by layer norm and group norm."""
    centred = x - x.mean(dim=dims, keepdim=True)
    return centred * torch.rsqrt(centred.detach().pow(2).mean(dim=dims, keepdim=True) + eps)


class NormMode(_RuleMode):
    """Conservative LayerNorm/RMSNorm rule (Ali et al. 2022): the normalising scale is a constant.

    ``rsqrt``/``sqrt``/``std``/``var``/``norm`` results are detached; ``F.layer_norm`` and
    ``F.rms_norm`` are recomputed with a detached scale. Centering stays linear.
    ``hits`` counts intercepted operations: zero after a forward means the norm was not recognised.
    """

    @classmethod
    def _table(cls) -> dict[Any, Handler]:
        return {
            **cls.on(_funcs("rsqrt", "sqrt", "std", "var", "norm"), cls._detached),
            **cls.on(_funcs("pow", "__pow__"), cls._pow),
            torch.linalg.vector_norm: cls._detached,
            F.layer_norm: cls._layer_norm,
            F.rms_norm: cls._rms_norm,
            F.group_norm: cls._group_norm,
            F.normalize: cls._normalize,
        }

    def _detached(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        out = func(*args, **kwargs)
        return out.detach() if isinstance(out, Tensor) else out

    def _pow(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        out = func(*args, **kwargs)
        exponent = args[1] if len(args) > 1 else kwargs.get("exponent")
        if isinstance(exponent, (int, float)) and exponent < 0:  # x.pow(-0.5): a normalising scale
            self._count()
            return out.detach()
        return out

    def _layer_norm(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        x, shape = args[0], args[1]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        y = _centred_constant_scale(acc(x), tuple(range(-len(shape), 0)), eps).to(x.dtype)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
        # F.layer_norm's output is contiguous whatever the input's layout, and model code views it
        # (SmolVLM's pixel shuffle after a transposed patch embedding)
        return y.contiguous()

    def _group_norm(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        x, groups = args[0], args[1]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        grouped = acc(x).reshape(x.shape[0], groups, -1)
        y = _centred_constant_scale(grouped, (-1,), eps).reshape(x.shape).to(x.dtype)
        per_channel = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            y = y * weight.reshape(per_channel)
        if bias is not None:
            y = y + bias.reshape(per_channel)
        return y

    def _rms_norm(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        x, shape = args[0], args[1]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        eps = args[3] if len(args) > 3 else kwargs.get("eps")
        dims = tuple(range(-len(shape), 0))
        xf = acc(x)
        eps = torch.finfo(xf.dtype).eps if eps is None else eps
        scale = torch.rsqrt(xf.detach().pow(2).mean(dim=dims, keepdim=True) + eps)
        y = (xf * scale).to(x.dtype)
        return y * weight if weight is not None else y

    def _normalize(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        return normalize_constant(args, kwargs)


def normalize_constant(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """``F.normalize`` with its norm held constant: a scaling, linear in the input."""
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 1)
    eps = args[3] if len(args) > 3 else kwargs.get("eps", 1e-12)
    denom = x.detach().norm(p=p, dim=dim, keepdim=True).clamp_min(eps)
    return x / denom


_MUL = _funcs("mul", "__mul__", "__rmul__", "multiply")
_ADD = _funcs("add", "__add__", "__radd__")
_MATMUL = _funcs("matmul", "__matmul__", "bmm") + [torch.einsum]


# autograd nodes that make a tensor the output of an element-wise non-linearity: the gate of a
# gated product (the identity rule's own node, or autograd's for an inline activation)
_GATE_NODES = frozenset(
    {
        "_IdentityRuleBackward",
        "SiluBackward0",
        "GeluBackward0",
        "SigmoidBackward0",
        "TanhBackward0",
        "ReluBackward0",
        "EluBackward0",
        "LeakyReluBackward0",
        "SoftplusBackward0",
        "MishBackward0",
        "HardswishBackward0",
        "HardsigmoidBackward0",
        "HardtanhBackward0",
    }
)
# nodes that keep the values as they are (casts, views): looked through when finding the gate
_SAME_VALUES = frozenset(
    {
        "ToCopyBackward0",
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "ExpandBackward0",
        "CloneBackward0",
        "AliasBackward0",
    }
)


def is_gate(t: Tensor) -> bool:
    """Whether ``t`` is the output of an element-wise non-linearity (up to casts and views)."""
    node = t.grad_fn
    for _ in range(4):
        if node is None:
            return False
        name = type(node).__name__
        if name in _GATE_NODES:
            return True
        if name not in _SAME_VALUES:
            return False
        node = next((n for n, _ in node.next_functions if n is not None), None)
    return False


_INLINE_ACTIVATIONS = (
    "sigmoid",
    "silu",
    "gelu",
    "tanh",
    "relu",
    "softplus",
    "mish",
    "elu",
    "clamp",
    "clip",
    "square",  # RWKV's channel mix: square(relu(x))
)


class ProductMode(_RuleMode):
    """The rule for element-wise products of two input-dependent tensors (gated MLPs, MoE).

    ``act(gate) * up`` and ``router_weight * expert_out``. By default the uniform rule: each
    factor receives half the relevance (Achtibat et al. 2024, Prop. 3.3). With
    ``constant_gate=True`` (CP-LRP as LXT defines it) the factor that is the output of an
    element-wise non-linearity is a constant, like an attention weight, and all relevance flows
    through the other factor; a product with no such factor, or two, keeps the uniform rule.
    Products with a constant or a parameter are left alone. An element-wise non-linearity
    called inline in the block (``F.sigmoid(shared_expert_gate(x)) * out`` in Qwen2-MoE) gets the
    identity rule, as an activation module does.
    """

    def __init__(self, constant_gate: bool = False) -> None:
        super().__init__()
        self.constant_gate = constant_gate
        # id(x + c) -> (x + c, x, c): a factor shifted by a constant (GPT-OSS's ``(up + 1) * glu``)
        self.shifted: dict[int, tuple[Tensor, Tensor, float]] = {}

    @classmethod
    def _table(cls) -> dict[Any, Handler]:
        return {
            **cls.on(_MUL, cls._mul),
            **cls.on(_ADD, cls._add),
            **cls.on(_funcs(*_INLINE_ACTIVATIONS, modules=(torch, _T, _TB, F)), cls._activation),
        }

    def _activation(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        return self._identity_rule(func, args, kwargs, count=False)

    def _add(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        out = func(*args, **kwargs)
        if len(args) == 2 and not kwargs and torch.is_grad_enabled():
            x, c = args if isinstance(args[0], Tensor) else args[::-1]
            if (
                isinstance(x, Tensor)
                and x.requires_grad
                and isinstance(c, (int, float))
                and not isinstance(c, bool)
                and c != 0
            ):
                self.shifted[id(out)] = (out, x, float(c))
        return out

    def _mul(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        if len(args) != 2 or kwargs or not _both_depend_on_input(args[0], args[1]):
            return func(*args, **kwargs)
        self._count()
        a, b = args
        for first, other in ((a, b), (b, a)):
            shift = self.shifted.get(id(first))
            if shift is not None and shift[0] is first:
                _, x, c = shift
                # (x + c)·g = x·g + c·g: the constant's term is g's relevance, not a constant's
                return self._product(func, x, other) + other * c
        return self._product(func, a, b)

    def _product(self, func, a, b):  # type: ignore[no-untyped-def]
        if self.constant_gate:
            gate_a, gate_b = is_gate(a), is_gate(b)
            if gate_a != gate_b:
                return func(a.detach(), b) if gate_a else func(a, b.detach())
        return uniform_mul(a, b)


class ElementwiseIdentityMode(_RuleMode):
    """Identity rule for element-wise non-linearities called as functions (``torch.tanh``, ``F.relu``...).

    Used for logit soft-capping, classification heads with inline ``tanh``/``relu`` and attention
    score soft-capping. ``suspended`` lets a patched sub-module (the backbone) run untouched.
    """

    NAMES = ("tanh", "relu", "gelu", "silu", "leaky_relu", "elu", "selu", "softplus", "mish", "hardtanh")

    def __init__(self, names: tuple[str, ...] = NAMES) -> None:
        super().__init__(names)

    @classmethod
    def _table(cls, names: tuple[str, ...] = NAMES) -> dict[Any, Handler]:
        return cls.on(_funcs(*names, modules=(torch, _T, _TB, F)), cls._identity)

    def _identity(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        return self._identity_rule(func, args, kwargs)


_DIV = _funcs("div", "__truediv__", "__itruediv__", "div_", "true_divide")


class RouterMode(_RuleMode):
    """An MoE router under AttnLRP: softmax keeps its gradient (the softmax rule), a sigmoid gets
    the identity rule, and a division by an input-dependent tensor (top-k weights over their
    sum) holds the denominator constant."""

    @classmethod
    def _table(cls) -> dict[Any, Handler]:
        return {
            **cls.on(_funcs("softmax", modules=(torch, _T, _TB, F)), cls._softmax),
            **cls.on(_funcs("sigmoid", modules=(torch, _T, _TB, F)), cls._sigmoid),
            **cls.on(_DIV, cls._div),
        }

    def _mha(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        return rule_mha(args, kwargs, self.detach_weights)

    def _softmax(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        return func(*args, **kwargs)

    def _sigmoid(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        return self._identity_rule(func, args, kwargs)

    def _div(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        if len(args) >= 2 and isinstance(args[1], Tensor) and args[1].requires_grad:
            self._count()
            return func(args[0], args[1].detach(), *args[2:], **kwargs)
        return func(*args, **kwargs)


class SDPARuleMode(_RuleMode):
    """The attention rule on ``scaled_dot_product_attention`` calls only (see :func:`rule_sdpa`)."""

    def __init__(self, detach_weights: bool) -> None:
        super().__init__()
        self.detach_weights = detach_weights

    @classmethod
    def _table(cls) -> dict[Any, Handler]:
        return {F.scaled_dot_product_attention: cls._sdpa}

    def _sdpa(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        return rule_sdpa(func, args, kwargs, self.detach_weights)[0]


class AttentionOpsMode(SDPARuleMode):
    """An attention rule for attention modules that do not dispatch through transformers' registry.

    - ``attnlrp``: uniform rule on ``q @ k.T`` and ``A @ v``; softmax keeps its gradient (the
      AttnLRP softmax rule); ``scaled_dot_product_attention`` gets the same rule through its own
      backward pass (:func:`~lxt_plus.engine.attention.rule_sdpa`).
    - ``ah-lrp``: softmax outputs are detached (attention weights are constants); relevance flows
      through ``v`` only.
    Soft-capping ``tanh`` on scores uses the identity rule. Additive attention (SwiftFormer) is
    covered too: an element-wise product of two input-dependent tensors gets the uniform rule, as
    ``q @ k.T`` does, and ``F.normalize`` holds its norm constant, as the norm rule does.
    ``nn.MultiheadAttention`` is ruled as its projections around ``scaled_dot_product_attention``.
    """

    @classmethod
    def _table(cls) -> dict[Any, Handler]:
        return {
            **super()._table(),
            F.multi_head_attention_forward: cls._mha,
            **cls.on(_funcs("softmax", modules=(torch, _T, _TB, F)), cls._softmax),
            **cls.on(_MATMUL, cls._matmul),
            **cls.on(_MUL, cls._mul),
            F.normalize: cls._normalize,
            **cls.on(_funcs("tanh", modules=(torch, _T, _TB, F)), cls._tanh),
            **cls.on(_funcs("exp", modules=(torch, _T)), cls._exp),
        }

    def _exp(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        """Weights held constant: an ``exp`` of input-dependent scores (a softmax written out, or
        RWKV's WKV weights ``exp(k + decay)`` over their running sum) is a constant too, so what it
        weighs (the values) takes all the relevance; under AttnLRP it keeps its gradient, and the
        operation check names it."""
        out = func(*args, **kwargs)
        if self.detach_weights and isinstance(out, Tensor) and out.grad_fn is not None:
            self._count()
            return out.detach()
        return out

    def _mul(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        if len(args) == 2 and not kwargs and _both_depend_on_input(args[0], args[1]):
            self._count()
            return uniform_mul(args[0], args[1])
        return func(*args, **kwargs)

    def _normalize(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        return normalize_constant(args, kwargs)

    def _mha(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        return rule_mha(args, kwargs, self.detach_weights)

    def _softmax(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        self._count()
        out = func(*args, **kwargs)
        return out.detach() if self.detach_weights else out

    def _matmul(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        if func is not torch.einsum and len(args) == 2 and not kwargs and _both_depend_on_input(*args):
            self._count()
            return uniform_matmul(args[0], args[1])
        return func(*args, **kwargs)

    def _tanh(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        return self._identity_rule(func, args, kwargs, count=False)


def is_positional(t: Any, leaves: Sequence[Tensor], budget: int = 64) -> bool:
    """Whether ``t`` is computed from ``leaves`` alone: every path of its autograd graph ends at
    one of them (through the ``unsqueeze``, slices, casts, ``repeat_interleave`` and
    concatenations that models apply to ``cos`` and ``sin``), looking at no more than ``budget``
    nodes. A tensor that also depends on the input (``q`` after the rotation) is not positional."""
    if not isinstance(t, Tensor) or not t.requires_grad or not leaves:
        return False
    targets = {id(leaf) for leaf in leaves}
    if id(t) in targets:
        return True
    stack = [t.grad_fn]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if node is None or seen > budget:
            return False
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in targets:
                return False
            continue
        parents = [n for n, _ in node.next_functions if n is not None]
        if not parents:
            return False
        stack.extend(parents)
    return True


class PositionalMode(_RuleMode):
    """The uniform rule on products of an input-dependent tensor with a positional leaf
    (``q * cos``): each factor receives half the relevance (Achtibat et al. 2024, Prop. 3.3), as
    for any product of two inputs. Every other operation runs unchanged."""

    def __init__(self, leaves: Sequence[Tensor]) -> None:
        super().__init__()
        self.leaves = list(leaves)

    @classmethod
    def _table(cls) -> dict[Any, Any]:
        return cls.on(_MUL, cls._mul)

    def _mul(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        if len(args) == 2 and not kwargs and torch.is_grad_enabled():
            a, b = args
            if (
                isinstance(a, Tensor)
                and isinstance(b, Tensor)
                and a.requires_grad
                and b.requires_grad
                and (is_positional(a, self.leaves) != is_positional(b, self.leaves))
            ):
                self._count()
                return uniform_mul(a, b)
        return func(*args, **kwargs)


_SCAN_PARAMETERS = ("sigmoid", "softplus")


class ScanMode(ProductMode):
    """MambaLRP's principle (Jafari et al. 2024) for scans whose parameters come from the same
    projection as their input (Mamba2's SSD, gated DeltaNet): every scan parameter is a constant,
    so the scan is linear in the values it mixes.

    - ``torch.split`` into the parts named by ``split`` (sizes, and the indices of the parameter
      parts: DeltaNet's ``q`` and ``k``, Mamba2's ``B`` and ``C``) returns those parts detached;
    - ``sigmoid`` and ``softplus`` of an input-dependent tensor (DeltaNet's β and decay, Mamba2's
      Δ) are detached;
    - everything else as in a gated MLP (:class:`ProductMode`): a product of two input-dependent
      tensors (the output gate ``y · silu(z)``) gets the uniform rule, and an inline element-wise
      non-linearity (the SiLU after the convolution, the gate's SiLU) the identity rule.
    """

    def __init__(self, split: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
        super().__init__()
        self.sizes, self.parameters = split

    @classmethod
    def _table(cls) -> dict[Any, Handler]:
        return {
            **super()._table(),  # the parameter handlers below take sigmoid and softplus over
            **cls.on(_funcs("split", modules=(torch, _T, _TB)), cls._split),
            **cls.on(_funcs(*_SCAN_PARAMETERS, modules=(torch, _T, _TB, F)), cls._parameter),
        }

    def _split(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        out = func(*args, **kwargs)
        sizes = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size"))
        if isinstance(sizes, (list, tuple)) and tuple(int(v) for v in sizes) == self.sizes:
            self._count()
            return type(out)(t.detach() if i in self.parameters else t for i, t in enumerate(out))
        return out

    def _parameter(self, func, args, kwargs):  # type: ignore[no-untyped-def]
        out = func(*args, **kwargs)
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled():
            self._count()
            return out.detach()
        return out


def scan_split(module: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The split of a scan module's convolved projection into value and parameter parts, read
    from its attributes: gated DeltaNet ``(key_dim, key_dim, value_dim)`` (or Kimi's
    ``qkv_dim`` three times) with ``q`` and ``k`` the parameters; Mamba2 ``(intermediate_size, n_groups·ssm_state_size, n_groups·ssm_state_size)``
    with ``B`` and ``C``. ``None`` for a module of neither kind."""
    key, value = getattr(module, "key_dim", None), getattr(module, "value_dim", None)
    if isinstance(key, int) and isinstance(value, int):
        return (key, key, value), (0, 1)
    qkv = getattr(module, "qkv_dim", None)  # Kimi's delta attention: q, k and v of one width
    if isinstance(qkv, int):
        return (qkv, qkv, qkv), (0, 1)
    inner, state, groups = (
        getattr(module, n, None) for n in ("intermediate_size", "ssm_state_size", "n_groups")
    )
    if isinstance(inner, int) and isinstance(state, int) and isinstance(groups, int):
        return (inner, groups * state, groups * state), (1, 2)
    return None
