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

from lxt_plus.api.explain import explain, explaining, model_kind
from lxt_plus.engine.detect import (
    embedding_leaves,
    end_of_sequence,
    find_block_list,
    image_shape,
    input_device,
    is_hf_model,
    model_dtype,
)
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


def _wanted(t: Any) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and t.is_floating_point()


def _random_ids(model: nn.Module, gen: torch.Generator) -> Tensor:
    """8 seeded random token ids; the last is the end-of-sequence token where one is configured
    and the model is no plain decoder (BART-style classifiers read the last EOS)."""
    cfg = cast(Any, model).config
    vocab = cast(Any, model).get_input_embeddings().num_embeddings
    ids = torch.randint(min(3, vocab - 1), vocab, (1, 8), generator=gen)
    eos = end_of_sequence(model, vocab)
    decoder_only = model_kind(model) == "causal-lm" and not getattr(cfg, "is_encoder_decoder", False)
    if eos is not None and not decoder_only:
        ids[0, -1] = eos
    return ids


Key = tuple[int, int]  # a tensor's id and version: an in-place update makes another tensor


@dataclass
class _Flow:
    """One module call: the keys of its measured inputs and outputs, and of the copies of its
    outputs that it handed on. ``outputs`` are what the module's relevance-out sums."""

    path: str
    module: nn.Module
    inputs: list[Key]
    outputs: list[Key]
    copy: Key | None = None  # a tensor output's copy handed to the caller (see ``aside``)
    complete: bool = True  # False: a ModelOutput of several tensors, only the first measured


class _FlowMeter:
    """Forward hooks that measure ``Σ t · ∂target/∂t`` at every module's inputs and outputs.

    Each input gets a fresh autograd node of its own, so only this module's share is measured.
    Each output is handed on as a copy, so in-place updates by the caller (``mlp_out += attn_out``)
    cannot change what was measured. Values are kept at the time they are measured.

    - A tensor output is measured as returned and as the copy. What it passes on beside the copy
      went to code that read it before the caller: transformers' output recorder keeps each layer's
      hidden state this way, and LLaVA reads one of them. That share (``aside``) counts as leaving
      every module around it.
    - A tuple's tensors are measured as the copies only: one of them may be computed from another
      (Perceiver's ``inputs`` from ``inputs_without_pos``), which the copies do not see.
    - A ``ModelOutput`` is measured at its first tensor, where it is. With several tensors (hidden
      states that its own layers also read) its output side is incomplete, and it is not judged.
    """

    def __init__(self) -> None:
        self.flows: list[_Flow] = []
        self.relevance: dict[Key, float] = {}
        self._kept: list[Tensor] = []  # alive until the end, so ids stay unique
        self._pending: dict[int, list[list[Key]]] = {}

    def measure(self, t: Tensor) -> Key:
        key = (id(t), t._version)
        if key in self.relevance:  # one tensor can be two modules' output (a model and its stack)
            return key
        self.relevance[key] = 0.0
        self._kept.append(t)
        value = t.detach().clone()

        def read(g: Tensor) -> None:
            self.relevance[key] += float((acc(value) * acc(g)).sum())

        t.register_hook(read)
        return key

    def _alias(self, obj: Any, keys: list[Key]) -> Any:
        if _wanted(obj):
            a = obj.view_as(obj)
            keys.append(self.measure(a))
            return a
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self._alias(o, keys) for o in obj)
        if isinstance(obj, list):
            return [self._alias(o, keys) for o in obj]
        return obj

    def _copy(self, t: Tensor, outputs: list[Key]) -> Tensor:
        given = t.clone()
        outputs.append(self.measure(given))
        return given

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        keys: list[Key] = []
        args = self._alias(args, keys)
        kwargs = {k: self._alias(v, keys) for k, v in kwargs.items()}
        self._pending.setdefault(id(module), []).append(keys)
        return args, kwargs

    def post(self, path: str, module: nn.Module, out: Any) -> Any:
        flow = _Flow(path, module, self._pending[id(module)].pop(), [])
        self.flows.append(flow)
        if _wanted(out):
            flow.outputs.append(self.measure(out))
            given = out.clone()
            flow.copy = self.measure(given)
            return given
        if isinstance(out, tuple) and not hasattr(out, "_fields"):  # (hidden, cls_token), ...
            if not any(_wanted(t) for t in out):
                return None
            return tuple(self._copy(t, flow.outputs) if _wanted(t) else t for t in out)
        found = [t for t in _tensors(out) if _wanted(t)]
        flow.outputs += [self.measure(t) for t in found[:1]]
        flow.complete = len(found) <= 1
        return None

    def aside(self, flow: _Flow) -> float:
        """What a tensor output passed on beside the copy handed to its caller."""
        if flow.copy is None:
            return 0.0
        return self.relevance[flow.outputs[0]] - self.relevance[flow.copy]

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        handles = []
        for path, module in model.named_modules():
            if path:
                handles.append(module.register_forward_pre_hook(self.pre, with_kwargs=True))
                handles.append(
                    module.register_forward_hook(
                        lambda m, a, o, p=path: self.post(p, m, o),
                    )
                )
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def audit(
    model: nn.Module,
    rules: str | Preset = "ah-lrp",
    *,
    inputs: Tensor | dict[str, Any] | None = None,
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
        ``input_ids`` ``(1, seq)``, pixel values, or a dict of model inputs (a processor's output;
        ``decoder_input_ids`` for an encoder-decoder); default 8 seeded random tokens (the last
        one the end-of-sequence token, except for decoder-only models). The forward and backward
        pass are :func:`~lxt_plus.explain`'s, so whatever ``explain`` takes, ``audit`` checks.
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
    gen = torch.Generator().manual_seed(seed)
    device = input_device(model)
    decoder_input_ids = None
    if isinstance(inputs, dict):  # a processor's output (a vision-language model's ids and images)
        inputs = dict(inputs)
        decoder_input_ids = inputs.pop("decoder_input_ids", None)
    elif inputs is None:
        if getattr(model, "main_input_name", "input_ids") != "input_ids":  # pixels (Perceiver: "inputs")
            inputs = torch.randn(1, *image_shape(model), generator=gen).to(model_dtype(model))
        else:
            inputs = _random_ids(model, gen)
    if isinstance(inputs, Tensor):
        inputs = inputs.to(device)
    meter = _FlowMeter()
    # strict=False: an operation without a rule is reported (report.operations), not raised
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LxtPlusWarning)
        context = explaining(model, preset, strict=False)
        handle = context.__enter__()
    with contextlib.ExitStack() as stack:
        stack.push(context.__exit__)
        report = handle.plan.operations
        if isinstance(inputs, dict) and "pixel_values" in inputs and report is not None and not report.images:
            # a vision tower the patch-time probe could not reach is checked on the first input with
            # images (check_images): let that pass run here, outside the meter, so it is not measured
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LxtPlusWarning)
                explain(model, inputs, rules=handle.preset, strict=False, decoder_input_ids=decoder_input_ids)
        # explain's own forward and backward (encoder-decoder prefixes, images, position leaves,
        # padding): the hooks read the relevance at each module's inputs and output on the way
        with meter.hooked(model), warnings.catch_warnings():
            warnings.simplefilter("ignore", LxtPlusWarning)
            result = explain(
                model, inputs, rules=handle.preset, strict=False, decoder_input_ids=decoder_input_ids
            )
        c = result.conservation
        target = float(c["target_logit"])
        input_rel = target - float(c["absorbed"])
        embs, added = embedding_leaves(model)
        embedded = {id(m) for m in [*embs, *added]}
        sources = [path for path, m in model.named_modules() if id(m) in embedded]
        r = meter.relevance
        asides = [(d.path, meter.aside(d)) for d in meter.flows if d.copy is not None]
        flows = []
        for f in meter.flows:
            if not f.inputs or not f.outputs or not f.complete or "Embedding" in type(f.module).__name__:
                continue  # embedding stages are where relevance is read, not passed on
            if any(src.startswith(f.path + ".") for src in sources):
                continue  # it embeds tokens itself (a decoder stack): relevance also lands inside it
            inner = sum(a for p, a in asides if p.startswith(f.path + "."))
            flows.append(
                ModuleFlow(
                    f.path,
                    type(f.module).__name__,
                    sum(r[o] for o in f.outputs) + inner,
                    sum(r[i] for i in f.inputs),
                )
            )
        blocks = find_block_list(model)
        layers = [f for f in flows if blocks is not None and f.path.rsplit(".", 1)[0] == blocks[0]]
        return AuditReport(
            type(model).__name__,
            handle.preset.name,
            target,
            input_rel,
            tolerance,
            flows,
            layers,
            handle.plan,
        )
