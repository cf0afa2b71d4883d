"""``audit``: prove a rule plan complete on a model, module by module.

With biases zeroed and a conservative preset (AH-LRP: attention weights and MoE gates held
constant, ε→0), every module must pass on exactly the relevance it receives. ``audit`` runs one
forward and one backward pass, measures relevance entering and leaving every module, and names
the first module where relevance leaks — the module a new architecture needs a rule for.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch import Tensor, nn

from lxt_plus.api.explain import explaining, leaf_at_embeddings, model_kind
from lxt_plus.engine.detect import find_block_list, image_shape, input_device, is_hf_model, model_dtype
from lxt_plus.engine.functional import acc
from lxt_plus.engine.opcheck import OpReport
from lxt_plus.engine.patching import handle_of
from lxt_plus.engine.plan import Plan, Preset, get_preset
from lxt_plus.errors import ConservationError, InputError, LxtPlusWarning

__all__ = ["audit", "AuditReport", "ModuleFlow"]


@dataclass
class ModuleFlow:
    """Relevance entering (from its output side) and leaving (to its inputs) one module."""

    path: str
    type_name: str
    relevance_out: float  # Σ y · ∂f/∂y at the module output
    relevance_in: float  # Σ x · ∂f/∂x at its inputs (this module's share only)

    @property
    def leak(self) -> float:
        return self.relevance_out - self.relevance_in


@dataclass
class AuditReport:
    """Result of :func:`audit`. ``ok`` is True when no module leaks more than ``tolerance``."""

    model_name: str
    preset: str
    target_logit: float
    input_relevance: float
    tolerance: float
    flows: list[ModuleFlow] = field(default_factory=list)
    layers: list[ModuleFlow] = field(default_factory=list)
    plan: Plan | None = None

    @property
    def operations(self) -> OpReport | None:
        """Completeness at the level of operations (``None`` when not probed): every operation
        between the embeddings and the logit linear or covered by a rule, or the ones that are not."""
        return None if self.plan is None else self.plan.operations

    @property
    def leaks(self) -> list[ModuleFlow]:
        scale = max(abs(self.target_logit), 1e-12)
        return [f for f in self.flows if abs(f.leak) > self.tolerance * scale]

    @property
    def first_leak(self) -> ModuleFlow | None:
        """The first module (in execution order, innermost first) that does not conserve relevance."""
        leaks = self.leaks
        return leaks[0] if leaks else None

    @property
    def total_error(self) -> float:
        return abs(self.input_relevance - self.target_logit) / max(abs(self.target_logit), 1e-12)

    @property
    def ok(self) -> bool:
        ops = self.operations
        complete = ops is None or not ops.checked or ops.ok
        return complete and self.first_leak is None and self.total_error <= self.tolerance

    def raise_for_leak(self) -> AuditReport:
        """Raise :class:`~lxt_plus.errors.ConservationError` naming the first leaking module (or the
        total error) unless the audit passed; return the report otherwise, for chaining."""
        if self.ok:
            return self
        leak = self.first_leak
        ops = self.operations
        if ops is not None and ops.checked and not ops.ok:
            raise ConservationError(
                f"{self.model_name}: {ops.summary()}. Give those modules a rule (preset.override), or "
                "report the architecture"
            )
        where = (
            f"first leak at {leak.path or '<model>'} ({leak.type_name}): {leak.relevance_out:+.6g} in, "
            f"{leak.relevance_in:+.6g} out"
            if leak is not None
            else f"input relevance {self.input_relevance:+.6g} of target logit {self.target_logit:+.6g}"
        )
        raise ConservationError(
            f"{self.model_name} does not conserve relevance under preset {self.preset!r} "
            f"(relative error {self.total_error:.2e}, tolerance {self.tolerance:g}); {where}. "
            "Give that module a conservative rule (preset.override), or report the architecture"
        )

    def __str__(self) -> str:
        lines = [] if self.plan is None else [self.plan.describe(), ""]
        lines.append(f"conservation audit of {self.model_name} with preset {self.preset!r} (biases zeroed)")
        lines.append(
            f"  target logit {self.target_logit:+.6g}   input relevance {self.input_relevance:+.6g}   "
            f"relative error {self.total_error:.2e}"
        )
        if self.layers:
            lines.append("  layer by layer (relevance entering each layer's output / leaving to its input):")
            for f in self.layers:
                lines.append(f"    {f.path:<40} out {f.relevance_out:+.6g}  in {f.relevance_in:+.6g}")
        if self.operations is not None:
            lines.append(f"  operations: {self.operations.summary()}")
        first = self.first_leak
        if first is None and self.ok:
            lines.append(
                f"  OK: every module conserves relevance (tolerance {self.tolerance:.0e} of the logit)"
            )
        elif first is None:
            lines.append("  LEAK: relevance is lost between the embeddings and the logit")
        else:
            lines.append(
                f"  LEAK: first module that does not conserve relevance: {first.path} ({first.type_name}) "
                f"receives {first.relevance_out:+.6g} at its output but passes {first.relevance_in:+.6g} "
                "to its inputs; it needs a rule"
            )
        return "\n".join(lines)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _alias(obj: Any, store: list[Tensor]) -> Any:
    """Give each float tensor that requires grad a fresh autograd node owned by one module."""
    if isinstance(obj, Tensor):
        if obj.requires_grad and obj.is_floating_point():
            a = obj.view_as(obj)
            store.append(a)
            return a
        return obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_alias(o, store) for o in obj)
    if isinstance(obj, list):
        return [_alias(o, store) for o in obj]
    return obj


@contextlib.contextmanager
def _flow_hooks(
    model: nn.Module, records: list[tuple[str, nn.Module, list[Tensor], list[Tensor]]]
) -> Iterator[None]:
    handles = []
    pending: dict[int, list[list[Tensor]]] = {}

    for path, module in model.named_modules():
        if path == "":
            continue

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], key: int = id(module)) -> Any:
            store: list[Tensor] = []
            args = _alias(args, store)
            kwargs = {k: _alias(v, store) for k, v in kwargs.items()}
            pending.setdefault(key, []).append(store)
            return args, kwargs

        def post(
            mod: nn.Module, args: Any, kwargs: Any, out: Any, key: int = id(module), p: str = path
        ) -> Any:
            inputs = pending[key].pop()
            # the caller gets a clone, so in-place updates of the output (``mlp_out += attn_out``)
            # cannot change the tensor measured here
            if isinstance(out, Tensor) and out.requires_grad and out.is_floating_point():
                records.append((p, mod, inputs, [out]))
                return out.clone()
            if (
                isinstance(out, tuple)
                and not hasattr(out, "_fields")
                and out
                and isinstance(out[0], Tensor)
                and out[0].requires_grad
                and out[0].is_floating_point()
            ):
                records.append((p, mod, inputs, [out[0]]))
                return (out[0].clone(), *out[1:])
            outs = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()][:1]
            records.append((p, mod, inputs, outs))
            return None

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def audit(
    model: nn.Module,
    rules: str | Preset = "ah-lrp",
    *,
    inputs: Tensor | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> AuditReport:
    """Check a rule plan on ``model``: biases zeroed, conservation layer by layer and module by module.

    Parameters
    ----------
    model:
        A HF model with token inputs (causal LM or classifier), or a HF image classifier.
    rules:
        The plan to audit. Biases are zeroed for the check (restored afterwards). Use a
        conservative preset (``"ah-lrp"``/``"cp-lrp"``): AttnLRP's softmax rule absorbs relevance
        by design, so an AttnLRP audit reports that as leaks in the attention modules.
    inputs:
        ``input_ids`` ``(1, seq)`` (or pixel values); default 8 seeded random tokens.
    tolerance:
        Allowed leak per module, relative to the target logit.

    Returns
    -------
    AuditReport
        ``print(report)`` shows the plan, the layer-by-layer table and the first leaking module.
    """
    if not is_hf_model(model):
        raise InputError(
            "audit() needs a HuggingFace model; for plain torch models compare "
            "explain(...).relevance.sum() with the target logit under 'conservative-check'"
        )
    if handle_of(model) is not None:
        raise InputError("audit() patches the model itself: remove the existing handle first")
    preset = replace(get_preset(rules), zero_bias=True)
    kind = model_kind(model)
    gen = torch.Generator().manual_seed(seed)
    device = input_device(model)
    if inputs is None:
        if getattr(model, "main_input_name", "input_ids") == "pixel_values":
            inputs = torch.randn(1, *image_shape(model), generator=gen).to(model_dtype(model))
        else:
            vocab = cast(Any, model).get_input_embeddings().num_embeddings
            inputs = torch.randint(min(3, vocab - 1), vocab, (1, 8), generator=gen)
    inputs = inputs.to(device)
    records: list[tuple[str, nn.Module, list[Tensor], list[Tensor]]] = []
    # strict=False: an operation without a rule is reported (report.operations), not raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LxtPlusWarning)
        context = explaining(model, preset, strict=False)
        handle = context.__enter__()
    with contextlib.ExitStack() as stack:
        stack.push(context.__exit__)
        store: list[Tensor] = []
        extra: list[Tensor] = []
        with _flow_hooks(model, records):
            if inputs.is_floating_point():
                leaf = inputs.detach().requires_grad_(True)
                logits = model(pixel_values=leaf).logits
                store.append(leaf)
            else:
                with leaf_at_embeddings(model, store, extra, 1):
                    logits = model(input_ids=inputs).logits
        out = logits[0, -1] if kind == "causal-lm" else logits[0]
        target = acc(out[int(out.argmax())])
        tensors = [store[0], *extra]
        for _, _, ins, outs in records:
            tensors += ins + outs
        grads = torch.autograd.grad(target, tensors, allow_unused=True)
        rel = {
            id(t): (0.0 if g is None else float((acc(t.detach()) * acc(g)).sum()))
            for t, g in zip(tensors, grads, strict=True)
        }
        input_rel = sum(rel[id(t)] for t in [store[0], *extra])
        flows = []
        for path, mod, ins, outs in records:
            if not ins or not outs or "Embedding" in type(mod).__name__:
                continue  # embedding stages are where relevance is read, not passed on
            flows.append(
                ModuleFlow(
                    path, type(mod).__name__, sum(rel[id(t)] for t in outs), sum(rel[id(t)] for t in ins)
                )
            )
        blocks = find_block_list(model)
        layers = [f for f in flows if blocks is not None and f.path.rsplit(".", 1)[0] == blocks[0]]
        return AuditReport(
            type(model).__name__,
            handle.preset.name,
            float(target.detach()),
            input_rel,
            tolerance,
            flows,
            layers,
            handle.plan,
        )
