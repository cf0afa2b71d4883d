"""Rules: small declarative objects with parameters and a readable ``repr``.

A rule says how relevance passes one module, and installs itself: :meth:`Rule.install` returns
the route it took and its own undo steps (see :mod:`lxt_plus.engine.install`). Most rules only build a
replacement forward from the original one (:meth:`Rule.wrap`); :mod:`lxt_plus.engine.patching` applies a
whole plan and never looks at a rule's concrete type.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lxt_plus.engine.detect import owning_pretrained
from lxt_plus.engine.functional import (
    LinearMap,
    Term,
    epsilon_rule,
    generalized_gamma_grad,
    identity_rule,
    modified_linear,
)
from lxt_plus.engine.hf import activation_classes
from lxt_plus.engine.install import ATTENTION_RULES, Installed, Site, wrap_forward
from lxt_plus.engine.modes import (
    AttentionOpsMode,
    ElementwiseIdentityMode,
    NormMode,
    ProductMode,
    RouterMode,
    ScanMode,
    scan_split,
)
from lxt_plus.engine.positional import positional_forward
from lxt_plus.errors import ConfigError, UnsupportedModelError, nearest

__all__ = [
    "Rule",
    "LinearRule",
    "AttentionRule",
    "Pass",
    "Epsilon",
    "Gamma",
    "ZPlus",
    "AlphaBeta",
    "ZBox",
    "Flat",
    "WSquare",
    "Identity",
    "Conservative",
    "UniformProduct",
    "ConstantGate",
    "AttnLRP",
    "AHLRP",
    "PAAttnLRP",
    "PAAHLRP",
    "Constant",
    "RouterLRP",
    "SelectiveScan",
    "gate_products",
    "DropoutOff",
    "HeadIdentity",
    "RULES",
    "register_rule",
    "list_rules",
    "rule_from_spec",
]

Forward = Callable[..., Any]


@dataclass(frozen=True)
class Rule:
    """Base class of every rule.

    A subclass overrides :meth:`wrap` (the usual case: a replacement forward) or :meth:`install`
    (a rule that needs another route), and :meth:`is_noop` if some parameters change nothing.
    Registered with :func:`register_rule`, it is usable by name in Python, YAML and the CLI.
    """

    name: ClassVar[str] = "rule"
    paper: ClassVar[str] = ""
    # kinds of operation (see lxt_plus.engine.opcheck) this rule keeps on the autograd path on
    # purpose, as its own definition: AttnLRP's softmax rule *is* the softmax's gradient
    covers: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        # a stabiliser or a γ below zero, or not finite, turns the rule into another one (a
        # negative ε pushes denominators towards zero): refused when the rule is made
        for key in ("eps", "gamma"):
            value = getattr(self, key, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"rule {self.name!r}: {key} must be a finite number, got {value!r}")
            if value < 0:
                raise ConfigError(f"rule {self.name!r}: {key} must be >= 0, got {value!r}")

    def wrap(self, module: nn.Module, forward: Forward, probe: dict[str, int]) -> Forward | None:
        """The module's new forward, built from its current ``forward``; ``None`` for no change.

        ``probe`` holds the counters of :class:`~lxt_plus.engine.install.Site` ``.stats``.
        """
        return None

    def is_noop(self) -> bool:
        """Whether this rule leaves every module as it is (plain gradient through it)."""
        return False

    def install(self, site: Site) -> Installed:
        """Apply the rule to ``site.module``; return the route taken and the undo steps."""
        undo: list[Callable[[], None]] = []
        changed = wrap_forward(site.module, lambda fwd: self.wrap(site.module, fwd, site.stats), undo)
        return Installed("forward" if changed else "none", undo)

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


@dataclass(frozen=True, repr=False)
class Pass(Rule):
    """No change: plain Gradient×Input through this module (softmax rule, LRP-0 on linear maps)."""

    name: ClassVar[str] = "pass"

    def is_noop(self) -> bool:
        return True


@dataclass(frozen=True, repr=False)
class Epsilon(Rule):
    """LRP-ε on a linear or convolutional layer (Bach et al. 2015); ``eps=0`` is LRP-0 (no change)."""

    name: ClassVar[str] = "epsilon"
    paper: ClassVar[str] = "Bach et al. 2015"
    eps: float = 0.0

    def is_noop(self) -> bool:
        return self.eps == 0.0

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        if self.eps == 0.0:
            return None
        eps = self.eps

        def fwd(*args: Any, **kwargs: Any) -> Any:
            return epsilon_rule(forward(*args, **kwargs), eps)

        return fwd


@dataclass(frozen=True, repr=False)
class LinearRule(Rule):
    """A rule that modifies a linear map (Linear, transformers' Conv1D, ConvNd) in the backward pass.

    Subclasses list their modified copies of the map as :class:`~lxt_plus.engine.functional.Term` s,
    in zennit's formulation (``BasicHook``: input modifier, parameter modifier, shared
    denominator, reducer); :func:`~lxt_plus.engine.functional.modified_linear` does the rest. Forward
    values are unchanged. ``eps`` stabilises the denominators (``+ε·sign``, ``sign 0 = +1``).
    """

    def terms(self) -> tuple[Term, ...]:
        """The modified copies of the linear map; every subclass defines them."""
        raise ConfigError(
            f"rule {self.name!r} ({type(self).__name__}) subclasses LinearRule but defines no terms(); "
            "return a tuple of lxt_plus.engine.functional.Term from it"
        )

    def bounds(self) -> tuple[Any, Any]:
        return None, None

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        try:
            lin = LinearMap(module)
        except UnsupportedModelError:
            kind = type(module).__name__
            raise UnsupportedModelError(
                f"rule {self.name!r} applies to Linear, Conv1D and ConvNd modules, not to {kind}; give "
                f"{kind} another rule, e.g. preset.override('type:{kind}', 'epsilon')"
            ) from None
        terms, eps, bounds = self.terms(), float(getattr(self, "eps", 1e-6)), self.bounds()

        def fwd(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            return modified_linear(x, lambda t: forward(t, *args, **kwargs), lin, terms, eps, bounds)

        return fwd


def _plus(gamma: float) -> Callable[[Tensor], Tensor]:
    return lambda p: p + gamma * p.clamp(min=0)


def _minus(gamma: float) -> Callable[[Tensor], Tensor]:
    return lambda p: p + gamma * p.clamp(max=0)


def _positive(p: Tensor) -> Tensor:
    return p.clamp(min=0)


def _negative(p: Tensor) -> Tensor:
    return p.clamp(max=0)


@dataclass(frozen=True, repr=False)
class Gamma(LinearRule):
    """LRP-γ, generalised to signed inputs and outputs as zennit defines it (``zennit.rules.Gamma``).

    For an output ``z_j > 0`` the positive inputs pair with ``w + γw⁺`` (and ``b + γb⁺``) and the
    negative inputs with ``w + γw⁻``; a negative output takes the mirrored pairs (Montavon et al.
    2019; Andéol et al. 2021). ``R_i = Σ_j x_i w̃_ij R_j / Σ_i' x_i' w̃_i'j`` within each branch.
    With ``generalized=False`` it is the original rule: ``w + γw⁺`` and ``b + γb⁺`` for every
    sign, which agrees with the generalised rule only for non-negative inputs and positive
    outputs. Forward values are unchanged.
    """

    name: ClassVar[str] = "gamma"
    paper: ClassVar[str] = "Montavon et al. 2019; Andéol et al. 2021"
    gamma: float = 0.25
    eps: float = 1e-6
    generalized: bool = True

    def terms(self) -> Any:
        if not self.generalized:
            return (Term("x", _plus(self.gamma)),)
        return generalized_gamma_grad(self.gamma)  # the four terms below, in closed form

    def generalized_terms(self) -> tuple[Term, ...]:
        """The generalised rule as zennit writes it: four modified copies of the map."""
        plus, minus = _plus(self.gamma), _minus(self.gamma)
        return (
            Term("pos", plus, group=0, mask="pos"),
            Term("neg", minus, zero_bias=True, group=0, mask="pos"),
            Term("pos", minus, group=1, mask="neg"),
            Term("neg", plus, zero_bias=True, group=1, mask="neg"),
        )


@dataclass(frozen=True, repr=False)
class ZPlus(LinearRule):
    """LRP-z⁺ (Bach et al. 2015; Montavon et al. 2017): only positive contributions ``x⁺w⁺`` and
    ``x⁻w⁻`` share the relevance (zennit's ``ZPlus``, equal to αβ with α=1, β=0)."""

    name: ClassVar[str] = "zplus"
    paper: ClassVar[str] = "Montavon et al. 2017"
    eps: float = 1e-6

    def terms(self) -> tuple[Term, ...]:
        return (Term("pos", _positive), Term("neg", _negative, zero_bias=True))


@dataclass(frozen=True, repr=False)
class AlphaBeta(LinearRule):
    """LRP-αβ (Bach et al. 2015): positive contributions weighted by α, negative ones by β
    (``α - β = 1``; zennit's ``AlphaBeta``). Common settings: α=2, β=1 and α=1, β=0."""

    name: ClassVar[str] = "alpha-beta"
    paper: ClassVar[str] = "Bach et al. 2015"
    alpha: float = 2.0
    beta: float = 1.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0 or abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise ConfigError(
                f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1, "
                f"got alpha={self.alpha}, beta={self.beta}"
            )

    def terms(self) -> tuple[Term, ...]:
        a, b = self.alpha, -self.beta
        return (
            Term("pos", _positive, group=0, coef=a),
            Term("neg", _negative, zero_bias=True, group=0, coef=a),
            Term("pos", _negative, group=1, coef=b),
            Term("neg", _positive, zero_bias=True, group=1, coef=b),
        )


def _bound(value: Any) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


@dataclass(frozen=True, repr=False)
class ZBox(LinearRule):
    """LRP-z^B for a bounded input layer (Montavon et al. 2017; zennit's ``ZBox``).

    ``low`` and ``high`` are the lowest and highest possible input values: floats, or one value
    per channel (dimension 1 of a convolution's input, the last dimension of a Linear's).
    Relevance is ``x w - l w⁺ - h w⁻`` over its sum; it lands on inputs that are ``0`` too, which
    lxt_plus reports exactly when this rule is applied to the explained input itself.
    """

    name: ClassVar[str] = "zbox"
    paper: ClassVar[str] = "Montavon et al. 2017"
    low: float | tuple[float, ...] = 0.0
    high: float | tuple[float, ...] = 1.0
    eps: float = 1e-6

    def bounds(self) -> tuple[Any, Any]:
        return _bound(self.low), _bound(self.high)

    def terms(self) -> tuple[Term, ...]:
        return (
            Term("x"),
            Term("low", _positive, sign=-1.0, coef=-1.0),
            Term("high", _negative, sign=-1.0, coef=-1.0),
        )


def _ones(p: Tensor) -> Tensor:
    return torch.ones_like(p)


def _square(p: Tensor) -> Tensor:
    return p * p


@dataclass(frozen=True, repr=False)
class Flat(LinearRule):
    """LRP-flat (Lapuschkin et al. 2019; zennit's ``Flat``): relevance spread evenly over each
    output's receptive field, whatever the inputs and weights. Meant for the input layer."""

    name: ClassVar[str] = "flat"
    paper: ClassVar[str] = "Lapuschkin et al. 2019"
    eps: float = 1e-6

    def terms(self) -> tuple[Term, ...]:
        return (Term("ones", _ones, zero_bias=True),)


@dataclass(frozen=True, repr=False)
class WSquare(LinearRule):
    """LRP-w² (Montavon et al. 2017; zennit's ``WSquare``): relevance in proportion to ``w²``,
    independent of the input. Meant for an unbounded input layer."""

    name: ClassVar[str] = "wsquare"
    paper: ClassVar[str] = "Montavon et al. 2017"
    eps: float = 1e-6

    def terms(self) -> tuple[Term, ...]:
        return (Term("ones", _square),)


@dataclass(frozen=True, repr=False)
class Identity(Rule):
    """Identity rule for an element-wise non-linearity: ``R(x) = R(f(x))`` (Achtibat et al. 2024)."""

    name: ClassVar[str] = "identity"
    paper: ClassVar[str] = "Achtibat et al. 2024"
    eps: float = 1e-12

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        eps = self.eps
        ratio = _closed_form_ratio(module)

        def fwd(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            return identity_rule(x, lambda t: forward(t, *args, **kwargs), eps, ratio)

        return fwd


def _relu_ratio(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


# f(x) / x in closed form for activation classes whose forward is exactly that function: one kernel
# instead of four (f(x), sign, add, divide), and exact at x = 0. Subclasses take the generic path.
_RATIOS: dict[type, Callable[[Tensor], Tensor]] = {nn.SiLU: torch.sigmoid, nn.ReLU: _relu_ratio}
_RATIOS.update({cls: torch.sigmoid for name, cls in activation_classes().items() if name == "silu"})


def _closed_form_ratio(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    return _RATIOS.get(type(module))


def _under_mode(
    forward: Forward, make_mode: Callable[[], Any], probe: dict[str, int], counter: str | None = None
) -> Forward:
    """``forward`` run inside a fresh torch-function mode; its hit count is added to ``probe[counter]``."""

    def fwd(*args: Any, **kwargs: Any) -> Any:
        mode = make_mode()
        with mode:
            out = forward(*args, **kwargs)
        if counter is not None:
            probe[counter] = probe.get(counter, 0) + mode.hits
        return out

    return fwd


@dataclass(frozen=True, repr=False)
class Conservative(Rule):
    """Conservative LayerNorm/RMSNorm rule: the normalising scale is a constant (Ali et al. 2022)."""

    name: ClassVar[str] = "conservative-norm"
    paper: ClassVar[str] = "Ali et al. 2022"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        return _under_mode(forward, NormMode, probe, "norm_hits")


@dataclass(frozen=True, repr=False)
class UniformProduct(Rule):
    """Uniform rule on products of two input-dependent factors (gated MLPs, MoE router × expert).

    Each factor receives half the relevance (Achtibat et al. 2024, Prop. 3.3).
    """

    name: ClassVar[str] = "uniform-product"
    paper: ClassVar[str] = "Achtibat et al. 2024"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        return _under_mode(forward, ProductMode, probe)


@dataclass(frozen=True, repr=False)
class ConstantGate(Rule):
    """CP-LRP's rule for gated products (LXT's ``cp_gated_mlp_forward``): in ``act(g) · u`` the gate
    ``act(g)`` is a constant, like an attention weight, and all relevance flows through ``u``.

    A product of two input-dependent factors where neither (or both) is the output of an
    element-wise non-linearity keeps the uniform rule.
    """

    name: ClassVar[str] = "constant-gate"
    paper: ClassVar[str] = "Ali et al. 2022; LXT (Achtibat et al. 2024)"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        return _under_mode(forward, lambda: ProductMode(constant_gate=True), probe)


def gate_products(module: nn.Module, undo: list[Callable[[], None]]) -> None:
    """Rule an attention module's output gate: ``out * sigmoid(gate)`` (Qwen3-Next, gated
    attention) is a product of two input-dependent factors, so it gets the uniform rule and the
    inline sigmoid the identity rule, as in a gated MLP. The attention function itself keeps its
    own rule. Installed by the patch-time operation check only where it found such a gate, so
    other attention modules pay nothing for it."""
    wrap_forward(module, lambda fwd: _under_mode(fwd, ProductMode, {}), undo)


@dataclass(frozen=True, repr=False)
class AttentionRule(Rule):
    """Base class of the attention rules: ``detach_weights`` says whether the attention weights are
    held constant (relevance through ``v`` only) or get AttnLRP's softmax and uniform rules.

    Attention of a model that dispatches through transformers' attention registry is ruled there
    (route ``"registry"``); any other attention module gets its inline ``softmax``/``matmul``
    operations ruled by a torch-function mode (route ``"ops"``).
    """

    detach_weights: ClassVar[bool] = False
    # PA-LRP: the module's ``position_embeddings`` (rotary cos, sin) are inputs that take relevance
    positional: ClassVar[bool] = False

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        """Route for attention that does not dispatch through transformers' registry."""
        detach = self.detach_weights
        fwd = _under_mode(forward, lambda: AttentionOpsMode(detach), probe, "attention_hits")
        return positional_forward(module, fwd) if self.positional else fwd

    def install(self, site: Site) -> Installed:
        owner = owning_pretrained(site.model, site.path)
        if (
            site.role == "attention"
            and not site.force_ops
            and owner is not None
            and type(owner)._can_set_attn_implementation()  # type: ignore[attr-defined]
        ):
            module = site.module
            ATTENTION_RULES[module] = (self, site.stats)

            def forget() -> None:
                ATTENTION_RULES.pop(module, None)

            undo: list[Callable[[], None]] = [forget]
            if self.positional:
                wrap_forward(module, lambda fwd: positional_forward(module, fwd), undo)
            return Installed("registry", undo)
        # the ops route on any module (one of unknown role given an attention rule by type or
        # name too): the probe then proves that the module computes attention it could rule
        done = super().install(site)
        return Installed("ops", done.undo)


@dataclass(frozen=True, repr=False)
class AttnLRP(AttentionRule):
    """AttnLRP (Achtibat et al. 2024): softmax rule, uniform rule on ``q·kᵀ`` and ``A·v``."""

    name: ClassVar[str] = "attnlrp"
    paper: ClassVar[str] = "Achtibat et al. 2024"
    detach_weights: ClassVar[bool] = False
    # the softmax rule is Gradient×Input through the softmax; q·kᵀ and A·v get the uniform rule as
    # gradient factors of 1/2 on q, k and v, so the products themselves stay on the path
    covers: ClassVar[frozenset[str]] = frozenset({"softmax", "product"})


@dataclass(frozen=True, repr=False)
class AHLRP(AttentionRule):
    """AH-LRP / CP-LRP (Ali et al. 2022): attention weights are constants; relevance flows via ``v``."""

    name: ClassVar[str] = "ah-lrp"
    paper: ClassVar[str] = "Ali et al. 2022"
    detach_weights: ClassVar[bool] = True
    covers: ClassVar[frozenset[str]] = frozenset({"product"})  # A·v with A detached, via autograd


@dataclass(frozen=True, repr=False)
class PAAttnLRP(AttnLRP):
    """AttnLRP with positional relevance (PA-LRP, Bakish et al. 2025): rotary ``cos`` and ``sin``
    are inputs, and each product ``q·cos``, ``rotate_half(q)·sin`` (and for ``k``) gets the uniform
    rule, half to the position. Added position tables take their share by the ε-rule on the sum,
    as under every rule."""

    name: ClassVar[str] = "pa-attnlrp"
    paper: ClassVar[str] = "Bakish et al. 2025; Achtibat et al. 2024"
    positional: ClassVar[bool] = True


@dataclass(frozen=True, repr=False)
class PAAHLRP(AHLRP):
    """AH-LRP with positional relevance (PA-LRP, Bakish et al. 2025). With the attention weights
    constant, rotary angles (which act only through the weights) receive none; added position
    tables (learned, sinusoidal) take their ε-rule share."""

    name: ClassVar[str] = "pa-ah-lrp"
    paper: ClassVar[str] = "Bakish et al. 2025; Ali et al. 2022"
    positional: ClassVar[bool] = True


def _detach_all(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return (
            type(out)(_detach_all(o) for o in out)
            if not hasattr(out, "_fields")
            else type(out)(*(_detach_all(o) for o in out))
        )
    if isinstance(out, list):
        return [_detach_all(o) for o in out]
    return out


@dataclass(frozen=True, repr=False)
class Constant(Rule):
    """The module's outputs are constants (a detached MoE router: gates act like attention weights)."""

    name: ClassVar[str] = "constant"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        def fwd(*args: Any, **kwargs: Any) -> Any:
            return _detach_all(forward(*args, **kwargs))

        return fwd


@dataclass(frozen=True, repr=False)
class RouterLRP(Rule):
    """AttnLRP's treatment of an MoE router: its softmax gets the softmax rule (Gradient×Input, as
    for attention scores), a sigmoid the identity rule, and the renormalisation of the top-k
    weights (``w / Σw``) holds the sum constant, as the conservative norm rule holds a scale."""

    name: ClassVar[str] = "router-lrp"
    paper: ClassVar[str] = "Achtibat et al. 2024"
    covers: ClassVar[frozenset[str]] = frozenset({"softmax"})

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        return _under_mode(forward, RouterMode, probe)


@dataclass(frozen=True, repr=False)
class SelectiveScan(Rule):
    """MambaLRP (Jafari et al. 2024) on a Mamba mixer: the scan's input-dependent parameters (Δ,
    B and C, all read from ``x_proj``) are constants, so the recurrence is linear in its input;
    the gate ``y · silu(z)`` gets the uniform rule (half to each factor) and the inline SiLUs the
    identity rule (the same relevance as the paper's ``x · sigmoid(x).detach()``). The RMSNorm
    around it is ruled as a norm.

    A mixer that computes its scan parameters in the same projection as its input (Mamba2's SSD:
    ``B``, ``C``; gated DeltaNet: ``q``, ``k``) gets the same principle from
    :class:`~lxt_plus.engine.modes.ScanMode`: the parameter parts of the split, and the gates
    ``sigmoid``/``softplus``, are constants. The split is read from the module's attributes
    (:func:`~lxt_plus.engine.modes.scan_split`); a mixer of neither layout is refused.
    """

    name: ClassVar[str] = "mamba-lrp"
    paper: ClassVar[str] = "Jafari et al. 2024"

    def install(self, site: Site) -> Installed:
        module = site.module
        proj = getattr(module, "x_proj", None)
        split = scan_split(module)
        if not isinstance(proj, nn.Module) and split is not None:
            undo_scan: list[Callable[[], None]] = []
            wrap_forward(
                module,
                lambda fwd: _under_mode(fwd, lambda: ScanMode(split), site.stats, "scan_hits"),
                undo_scan,
            )
            return Installed("forward", undo_scan)
        if not isinstance(proj, nn.Module):
            raise UnsupportedModelError(
                f"{site.path} ({type(module).__name__}) is a state-space or linear-attention module whose scan "
                "parameters lxt_plus cannot tell apart from its input: it has neither an x_proj (Mamba, "
                "FalconMamba) nor the split of Mamba2 (intermediate_size, n_groups, ssm_state_size) or gated "
                "DeltaNet (key_dim, value_dim) that the MambaLRP rule reads"
            )
        undo: list[Callable[[], None]] = []
        wrap_forward(proj, lambda fwd: lambda *a, **k: _detach_all(fwd(*a, **k)), undo)
        wrap_forward(module, lambda fwd: _under_mode(fwd, ProductMode, site.stats), undo)
        return Installed("forward", undo)


@dataclass(frozen=True, repr=False)
class DropoutOff(Rule):
    """Dropout is the identity while explaining (also in train mode, e.g. for checkpointing)."""

    name: ClassVar[str] = "dropout-off"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        def fwd(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return x

        return fwd


# The head mode of the current thread, so that the backbone can step out of it.
_HEAD_MODE: contextvars.ContextVar[ElementwiseIdentityMode | None] = contextvars.ContextVar(
    "lxt_plus_head_mode", default=None
)


# element-wise activation modules' homes; softmax-like modules there are not element-wise
_ACTIVATION_HOMES = ("transformers.activations", "torch.nn.modules.activation")
_NOT_ELEMENTWISE = frozenset(("Softmax", "Softmin", "LogSoftmax", "Softmax2d", "MultiheadAttention", "GLU"))


def _made_activation(module: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook (global, held by :func:`_made_activations` for one head call): the identity
    rule on an element-wise activation module called in the head, outside the backbone."""
    mode = _HEAD_MODE.get()
    if mode is None or mode.suspended:  # another thread's or context's module call, or the backbone's
        return None
    cls = type(module)
    if cls.__module__ not in _ACTIVATION_HOMES or cls.__name__ in _NOT_ELEMENTWISE:
        return None
    x = args[0] if args else None
    if not (isinstance(x, Tensor) and isinstance(out, Tensor) and x.requires_grad and out.shape == x.shape):
        return None
    value = out.detach()
    return identity_rule(x, lambda _: value)


class _MadeActivations:
    """An activation module made during a head's call (``ACT2FN[name](x)`` in BigBird's
    classifier) is no submodule to rule. A global forward hook, held for the head's call only and
    acting in its thread's context only, gives it the identity rule. It is off while the backbone
    runs, so that the backbone's modules keep torch's fast call path."""

    _HANDLES: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
        "lxt_plus_made_activations", default=None
    )

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        handles = [nn.modules.module.register_module_forward_hook(_made_activation)]
        token = self._HANDLES.set(handles)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self._HANDLES.reset(token)

    def pause(self) -> None:
        handles = self._HANDLES.get()
        if handles:
            handles.pop().remove()

    def resume(self) -> None:
        handles = self._HANDLES.get()
        if handles is not None and not handles:
            handles.append(nn.modules.module.register_module_forward_hook(_made_activation))


_made_activations = _MadeActivations()


@dataclass(frozen=True, repr=False)
class HeadIdentity(Rule):
    """Identity rule for non-linearities written inline in a task head (``torch.tanh`` in a pooler or
    classifier, final-logit soft-capping). The backbone runs outside this rule."""

    name: ClassVar[str] = "head-identity"
    paper: ClassVar[str] = "Achtibat et al. 2024"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        def fwd(*args: Any, **kwargs: Any) -> Any:
            mode = ElementwiseIdentityMode()
            token = _HEAD_MODE.set(mode)
            try:
                with mode, _made_activations():
                    return forward(*args, **kwargs)
            finally:
                _HEAD_MODE.reset(token)

        return fwd

    def install(self, site: Site) -> Installed:
        done = super().install(site)
        backbone = getattr(site.model, "base_model", None)
        if not done.noop and isinstance(backbone, nn.Module) and backbone is not site.model:
            wrap_forward(backbone, self.wrap_backbone, done.undo)
        return done

    @staticmethod
    def wrap_backbone(forward: Forward) -> Forward:
        from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

        def fwd(*args: Any, **kwargs: Any) -> Any:
            mode = _HEAD_MODE.get()
            if mode is None:
                return forward(*args, **kwargs)
            token = _HEAD_MODE.set(None)
            try:
                _made_activations.pause()
                stack = _get_current_function_mode_stack()
                if stack and stack[-1] is mode:  # step out of the head mode: no per-op cost
                    with _pop_mode_temporarily():
                        return forward(*args, **kwargs)
                mode.suspended = True
                try:
                    return forward(*args, **kwargs)
                finally:
                    mode.suspended = False
            finally:
                _made_activations.resume()
                _HEAD_MODE.reset(token)

        return fwd


RULES: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule] | None = None, *, name: str | None = None) -> Any:
    """Make a :class:`Rule` subclass usable by name in Python, YAML presets and the CLI.

    Use as a decorator (``@register_rule``) or call it (``register_rule(MyRule, name="alias")``).
    The name defaults to the class's ``name``; registering a different class under a taken name
    raises :class:`~lxt_plus.errors.ConfigError`.
    """

    def add(rule_cls: type[Rule]) -> type[Rule]:
        if not (isinstance(rule_cls, type) and issubclass(rule_cls, Rule)):
            raise ConfigError(f"register_rule needs a Rule subclass, got {rule_cls!r}")
        key = name or rule_cls.name
        if RULES.get(key, rule_cls) is not rule_cls:
            raise ConfigError(f"a rule named {key!r} is already registered ({RULES[key].__name__})")
        RULES[key] = rule_cls
        return rule_cls

    return add if cls is None else add(cls)


def list_rules() -> list[str]:
    """Every rule name that presets, YAML files and the CLI accept."""
    return sorted(RULES)


for _cls in (
    Pass,
    Epsilon,
    Gamma,
    ZPlus,
    AlphaBeta,
    ZBox,
    Flat,
    WSquare,
    Identity,
    Conservative,
    UniformProduct,
    ConstantGate,
    AttnLRP,
    AHLRP,
    PAAttnLRP,
    PAAHLRP,
    Constant,
    RouterLRP,
    SelectiveScan,
    DropoutOff,
    HeadIdentity,
):
    register_rule(_cls)
register_rule(AHLRP, name="cp-lrp")  # CP-LRP's attention rule is AH-LRP's
register_rule(Pass, name="gradient")


def _coerce(cls: type[Rule], key: str, value: Any, where: str) -> Any:
    """A YAML/CLI value as the declared type of field ``key`` (bool, int, float, str, a tuple of
    floats, or a union of those with ``None``); values of other declared types pass unchanged."""
    hint = typing.get_type_hints(cls).get(key, Any)
    options = (
        set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    )
    if value is None and type(None) in options:
        return None
    options.discard(type(None))
    sequences = [o for o in options if typing.get_origin(o) is tuple]
    bad = f"{where}: parameter {key!r} of rule {cls.name!r}"
    if sequences and isinstance(value, (list, tuple)):
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{bad} is a list of numbers, got {value!r}") from None
    if bool in options:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{bad} is true or false, got {value!r}")
    if int in options and float not in options:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{bad} is a whole number, got {value!r}")
    if float in options:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{bad} is a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{bad} is a number, got {value!r}") from None
    if str in options:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{bad} is a string, got {value!r}")
    return value


def rule_from_spec(spec: Any, where: str = "rule") -> Rule:
    """A rule from a name (``"epsilon"``), a dict (``{"epsilon": {"eps": 1e-6}}`` or
    ``{"name": "gamma", "gamma": 0.25}``) or a :class:`Rule` instance."""
    if isinstance(spec, Rule):
        return spec
    params: dict[str, Any] = {}
    if isinstance(spec, dict):
        if "name" in spec:
            params = {k: v for k, v in spec.items() if k != "name"}
            spec = spec["name"]
        elif len(spec) == 1:
            spec, params = next(iter(spec.items()))
            params = dict(params or {})
        else:
            raise ConfigError(f"{where}: a rule is a name or a one-key mapping, got {spec!r}")
    if not isinstance(spec, str) or spec not in RULES:
        raise ConfigError(
            f"{where}: unknown rule {spec!r}{nearest(str(spec), RULES)}; "
            f"valid rules: {', '.join(list_rules())}"
        )
    cls = RULES[spec]
    valid = {f.name for f in fields(cls)}
    for key in params:
        if key not in valid:
            raise ConfigError(
                f"{where}: rule {spec!r} has no parameter {key!r}{nearest(key, valid)}; "
                f"valid: {', '.join(sorted(valid)) or '(none)'}"
            )
    values = {k: _coerce(cls, k, v, where) for k, v in params.items()}
    try:
        return cls(**values)
    except ConfigError as exc:  # a value the rule refuses (Rule.__post_init__)
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad parameters for rule {spec!r}: {exc}") from None
