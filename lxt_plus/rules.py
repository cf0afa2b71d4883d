"""Rules: small declarative objects with parameters and a readable ``repr``.

A rule says how relevance passes one module. How it is installed (instance ``forward`` wrappers,
torch-function modes, the attention registry) lives in :mod:`lxt_plus.patching`; a rule only
builds the replacement forward from the original one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .functional import epsilon_rule, identity_rule, stabilize
from .modes import AttentionOpsMode, ElementwiseIdentityMode, NormMode, ProductMode

__all__ = [
    "Rule", "Pass", "Epsilon", "Gamma", "Identity", "Conservative", "UniformProduct", "AttnLRP",
    "AHLRP", "Constant", "DropoutOff", "HeadIdentity", "RULES", "rule_from_spec",
]

Forward = Callable[..., Any]


@dataclass(frozen=True)
class Rule:
    """Base class. ``wrap(module, forward)`` returns the patched forward, or ``None`` for no change."""

    name: ClassVar[str] = "rule"
    paper: ClassVar[str] = ""

    def wrap(self, module: nn.Module, forward: Forward, probe: dict[str, int]) -> Forward | None:
        return None

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"


@dataclass(frozen=True, repr=False)
class Pass(Rule):
    """No change: plain Gradient×Input through this module (softmax rule, LRP-0 on linear maps)."""

    name: ClassVar[str] = "pass"


@dataclass(frozen=True, repr=False)
class Epsilon(Rule):
    """LRP-ε on a linear or convolutional layer (Bach et al. 2015); ``eps=0`` is LRP-0 (no change)."""

    name: ClassVar[str] = "epsilon"
    paper: ClassVar[str] = "Bach et al. 2015"
    eps: float = 0.0

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        if self.eps == 0.0:
            return None
        eps = self.eps

        def fwd(*args: Any, **kwargs: Any) -> Any:
            return epsilon_rule(forward(*args, **kwargs), eps)

        return fwd


def _affine_with(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(module, nn.Linear):
        return torch.nn.functional.linear(x, weight, bias)
    if isinstance(module, nn.modules.conv._ConvNd):
        return module._conv_forward(x, weight, bias)  # type: ignore[operator]
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 style, weight (in, out)
        out = x.reshape(-1, x.shape[-1]) @ weight
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], weight.shape[-1])
    raise TypeError(f"the gamma rule needs a Linear, Conv1D or ConvNd module, got {type(module).__name__}")


@dataclass(frozen=True, repr=False)
class Gamma(Rule):
    """LRP-γ on a linear or convolutional layer: positive weights are favoured by ``1 + γ``.

    ``R_i = Σ_j x_i (w_ij + γ w_ij⁺) R_j / Σ_i' x_i' (w_i'j + γ w_i'j⁺)`` (Montavon et al. 2019);
    used by AttnLRP for vision transformers. Forward values are unchanged.
    """

    name: ClassVar[str] = "gamma"
    paper: ClassVar[str] = "Montavon et al. 2019"
    gamma: float = 0.25
    eps: float = 1e-9

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        gamma, eps = self.gamma, self.eps

        def fwd(x: Tensor, *args: Any, **kwargs: Any) -> Any:
            z = forward(x, *args, **kwargs)
            if not (torch.is_grad_enabled() and x.requires_grad):
                return z
            w = module.weight.detach()
            b = None if getattr(module, "bias", None) is None else module.bias.detach()
            w_g = w + gamma * w.clamp(min=0)
            b_g = None if b is None else b + gamma * b.clamp(min=0)
            z_g = _affine_with(module, x, w_g, b_g)
            # value z exactly; gradient of z_g scaled by z / z_g (the γ-rule's redistribution)
            t = z_g * (z.detach() / stabilize(z_g.detach(), eps))
            return z.detach() + (t - t.detach())

        return fwd


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
try:
    from transformers.activations import SiLUActivation

    _RATIOS[SiLUActivation] = torch.sigmoid
except ImportError:  # pragma: no cover - older or newer transformers without the class
    pass


def _closed_form_ratio(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    return _RATIOS.get(type(module))


def _under_mode(forward: Forward, make_mode: Callable[[], Any], probe: dict[str, int],
                counter: str | None = None) -> Forward:
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
class _AttentionRule(Rule):
    detach_weights: ClassVar[bool] = False

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        """Route for attention that does not dispatch through transformers' registry."""
        detach = self.detach_weights
        return _under_mode(forward, lambda: AttentionOpsMode(detach), probe, "attention_hits")


@dataclass(frozen=True, repr=False)
class AttnLRP(_AttentionRule):
    """AttnLRP (Achtibat et al. 2024): softmax rule, uniform rule on ``q·kᵀ`` and ``A·v``."""

    name: ClassVar[str] = "attnlrp"
    paper: ClassVar[str] = "Achtibat et al. 2024"
    detach_weights: ClassVar[bool] = False


@dataclass(frozen=True, repr=False)
class AHLRP(_AttentionRule):
    """AH-LRP / CP-LRP (Ali et al. 2022): attention weights are constants; relevance flows via ``v``."""

    name: ClassVar[str] = "ah-lrp"
    paper: ClassVar[str] = "Ali et al. 2022"
    detach_weights: ClassVar[bool] = True


def _detach_all(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return type(out)(_detach_all(o) for o in out) if not hasattr(out, "_fields") else type(out)(
            *(_detach_all(o) for o in out))
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
class DropoutOff(Rule):
    """Dropout is the identity while explaining (also in train mode, e.g. for checkpointing)."""

    name: ClassVar[str] = "dropout-off"

    def wrap(self, module, forward, probe):  # type: ignore[no-untyped-def]
        def fwd(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            return x

        return fwd


# The head mode of the current thread, so that the backbone can step out of it.
_HEAD_MODE: contextvars.ContextVar[ElementwiseIdentityMode | None] = contextvars.ContextVar(
    "lxt_plus_head_mode", default=None)


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
                with mode:
                    return forward(*args, **kwargs)
            finally:
                _HEAD_MODE.reset(token)

        return fwd

    @staticmethod
    def wrap_backbone(forward: Forward) -> Forward:
        from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

        def fwd(*args: Any, **kwargs: Any) -> Any:
            mode = _HEAD_MODE.get()
            if mode is None:
                return forward(*args, **kwargs)
            token = _HEAD_MODE.set(None)
            try:
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
                _HEAD_MODE.reset(token)

        return fwd


RULES: dict[str, type[Rule]] = {
    cls.name: cls
    for cls in (Pass, Epsilon, Gamma, Identity, Conservative, UniformProduct, AttnLRP, AHLRP, Constant,
                DropoutOff, HeadIdentity)
}
RULES["cp-lrp"] = AHLRP
RULES["gradient"] = Pass


def rule_from_spec(spec: Any, where: str = "rule") -> Rule:
    """A rule from a name (``"epsilon"``), a dict (``{"epsilon": {"eps": 1e-6}}`` or
    ``{"name": "gamma", "gamma": 0.25}``) or a :class:`Rule` instance."""
    from .errors import ConfigError
    from .plan import nearest

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
        raise ConfigError(f"{where}: unknown rule {spec!r}{nearest(str(spec), RULES)}; "
                          f"valid rules: {', '.join(sorted(RULES))}")
    cls = RULES[spec]
    valid = {f.name for f in fields(cls)}
    for key in params:
        if key not in valid:
            raise ConfigError(f"{where}: rule {spec!r} has no parameter {key!r}{nearest(key, valid)}; "
                              f"valid: {', '.join(sorted(valid)) or '(none)'}")
    try:
        return cls(**{k: float(v) for k, v in params.items()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad parameters for rule {spec!r}: {exc}") from None
