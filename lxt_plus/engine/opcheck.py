"""Completeness at the level of operations: every op between the input embeddings and the target.

A rule plan is complete when each operation on the relevance path is either

- *linear* in the relevance-carrying input (matmul or linear with a constant, add, concat, reshape,
  indexing, mean, scaling by a constant, ...), or piecewise linear and positively homogeneous
  (ReLU, max-pooling, selection), so Gradient×Input passes relevance through it unchanged;
- *covered by a rule* of the plan (an lxt_plus rule's own backward function, or attention that an
  attention rule wraps);
- or else *unknown*: ``exp``, a division by or a product of two input-dependent tensors with no
  rule, a selective scan, a softmax no rule holds, ...

:func:`check_operations` runs the patched model once on a tiny probe input with grad on and the
weights frozen, so the autograd graph holds exactly the input-dependent operations; it walks
that graph from the output back to the input leaves and sorts each node into one of the three
kinds. A torch-function mode with module hooks records which module made each node, so an
unknown operation is named together with its module path. It runs once per model and plan, at
patch time, and the result is cached with the plan.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from lxt_plus.engine.attention import KEEP_WEIGHTS_UP_TO

__all__ = ["OpFinding", "OpReport", "SavedMemory", "check_operations", "classify_node", "saved_memory"]

# autograd node names (without "Backward<N>") of operations linear in their differentiable input
_LINEAR = frozenset(
    """Add Sub Neg View ReshapeAlias UnsafeView Expand Permute Transpose T Cat Stack Select Slice
    SliceScatter SelectScatter Index IndexSelect Gather Split SplitWithSizes Unbind Squeeze Unsqueeze
    Clone ToCopy Alias Mean Sum Cumsum ConstantPadNd ReflectionPad1d ReflectionPad2d ReflectionPad3d
    ReplicationPad1d ReplicationPad2d ReplicationPad3d Flip Roll Repeat AsStrided Diagonal Tril Triu
    MaskedFill MaskedScatter IndexPut IndexAdd ScatterAdd Scatter CopySlices Copy Narrow Unfold Im2Col
    Col2Im AvgPool1D AvgPool2D AvgPool3D AdaptiveAvgPool1D AdaptiveAvgPool2D AdaptiveAvgPool3D
    UpsampleNearest1D UpsampleNearest2D UpsampleNearest3D UpsampleNearestExact1D UpsampleNearestExact2D
    UpsampleLinear1D UpsampleBilinear2D UpsampleTrilinear3D UpsampleBicubic2D PixelShuffle
    PixelUnshuffle Where Expand ViewAsReal ViewAsComplex Real Imag Conj Lift LiftFresh Trace Movedim
    SumToSize Diag DiagEmbed Fill Zero Squeeze Unflatten Flatten Chunk Split Lerp FftR2C FftC2C FftC2R""".split()
)
# piecewise linear and positively homogeneous: Gradient×Input conserves through them
_HOMOGENEOUS = frozenset(
    """Relu LeakyRelu Threshold Abs MaxPool2DWithIndices MaxPool3DWithIndices MaxPool1D MaxPool2D
    AdaptiveMaxPool1D AdaptiveMaxPool2D AdaptiveMaxPool3D Max Min Amax Amin Topk Sort Maximum Minimum
    Kthvalue Median Cummax Cummin""".split()
)
# products: linear when at most one factor depends on the input, a product of two otherwise
# (grid sampling is a product of the values and weights made from the grid: linear in the values
# when the grid is a constant, GLM-4V's resized position table)
_PRODUCTS = frozenset(
    """Mul Mm Bmm GroupedMm Addmm Mv Addmv Baddbmm Addbmm Dot Vdot Outer Kron Convolution Linear
    GridSampler2D GridSampler3D""".split()
)
_ATTENTION = re.compile(r"ScaledDotProduct|FlashAttention|EfficientAttention|CudnnAttention")

_ELEMENTWISE = frozenset(
    """Exp Exp2 Expm1 Log Log2 Log10 Log1p Sigmoid Tanh Silu Gelu Erf Erfc Softplus Sin Cos Tan Pow
    Sqrt Rsqrt Reciprocal Clamp ClampMin ClampMax Hardtanh Elu Celu Selu Mish Hardswish Hardsigmoid
    Atan Asin Acos Sinh Cosh Asinh Acosh Atanh Sign Round Floor Ceil Frac""".split()
)
_FITS = {
    "elementwise": "an element-wise rule: Identity() (preset.override('type:<Module>', 'identity'))",
    "product": "UniformProduct() for a product of two input-dependent factors (role mlp), or hold "
    "one factor constant (Constant())",
    "division": "Conservative() if this normalises (the scale held constant), else a product rule",
    "softmax": "an attention rule (AttnLRP() or AHLRP()) or Constant() for router weights",
    "attention": "an attention rule (AttnLRP() or AHLRP()) on the module that calls it",
    "norm": "Conservative() (role norm: the scale held constant)",
    "constant": "nothing that conserves: a constant that is not a bias parameter (a position table "
    "computed in forward) absorbs relevance as a bias does; zero_bias cannot zero it",
    "scan": "a state-space rule for selective scans (MambaLRP); lxt_plus has none for this operation",
    "custom": "a rule for this custom autograd function (docs/howto/custom-rule.md); its backward "
    "pass is not known to be linear",
    "other": "no lxt_plus rule fits; write one (docs/howto/custom-rule.md)",
}


def _kind_of(base: str) -> str:
    if base in _ELEMENTWISE:
        return "elementwise"
    if base in ("Softmax", "SafeSoftmax", "LogSoftmax", "Softmin"):  # SafeSoftmax: SDPA's math path
        return "softmax"
    if base in (
        "NativeLayerNorm",
        "NativeGroupNorm",
        "NativeBatchNorm",
        "Var",
        "Std",
        "LinalgVectorNorm",
        "Norm",
        "FusedRmsNorm",
    ):
        return "norm"
    if base in ("Cumprod", "Prod", "Logcumsumexp", "Logsumexp"):
        return "scan"
    return "other"


@dataclass(frozen=True)
class OpFinding:
    """One operation on the relevance path that no rule accounts for."""

    op: str  # what the code called: "exp", "mul of two input-dependent tensors", ...
    node: str  # the autograd node: "ExpBackward0"
    path: str  # module path ("" is the model itself)
    module_type: str
    fits: str  # the rule that would fit
    kind: str = "other"  # elementwise | product | division | softmax | attention | norm | scan | custom | constant | other

    def __str__(self) -> str:
        return f"{self.op} in {self.path or '<model>'} ({self.module_type}; would fit: {self.fits})"


@dataclass(frozen=True)
class SavedMemory:
    """What autograd keeps for the backward pass, per explained token, measured on the probe.

    ``per_token``: bytes of saved activations that grow with the sequence (hidden states, keys,
    values); ``per_pair``: bytes per (query, key) pair, for attention weights kept whole (eager
    attention). Weights and buffers are not counted: they are loaded already.
    """

    per_token: float
    per_pair: float
    per_kept_pair: float = 0.0  # attention weights that lxt_plus keeps only up to ``KEEP_WEIGHTS_UP_TO`` keys

    def estimate(self, rows: int, tokens: int) -> int:
        """Bytes the backward pass keeps for ``rows`` sequences of ``tokens`` tokens."""
        pairs = self.per_pair + (self.per_kept_pair if tokens <= KEEP_WEIGHTS_UP_TO else 0.0)
        return int(rows * (self.per_token * tokens + pairs * tokens * tokens))


@dataclass
class OpReport:
    """What :func:`check_operations` found: node counts per kind, and the unknown operations."""

    checked: bool = True
    counts: dict[str, int] = field(default_factory=dict)  # linear | homogeneous | rule | attention
    unknown: list[OpFinding] = field(default_factory=list)
    reason: str = ""  # why nothing was checked, when ``checked`` is False
    memory: SavedMemory | None = None  # what the backward pass keeps, measured on the probe
    images: bool = False  # the checked input held images (pixels are a leaf of the check)

    @property
    def ok(self) -> bool:
        return self.checked and not self.unknown

    def summary(self) -> str:
        if not self.checked:
            return f"operations not checked: {self.reason}"
        total = sum(self.counts.values()) + len(self.unknown)
        parts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
        if not self.unknown:
            return f"all {total} operations on the relevance path accounted for ({parts})"
        return f"{len(self.unknown)} of {total} operations have no rule: {self.listing()}"

    def listing(self, limit: int = 6) -> str:
        """The first ``limit`` unknown operations, each with its module and the rule that would fit."""
        more = f" and {len(self.unknown) - limit} more" if len(self.unknown) > limit else ""
        return "; ".join(str(f) for f in self.unknown[:limit]) + more


def _base(node: Any) -> str:
    return re.sub(r"Backward\d*$", "", type(node).__name__)


def _deps(node: Any) -> list[Any]:
    return [f for f, _ in node.next_functions if f is not None]


def classify_node(node: Any, ruled: bool) -> tuple[str, str]:
    """``(kind, what)`` for one autograd node: kind is linear | homogeneous | rule | attention |
    one of the unknown kinds (elementwise, product, division, softmax, norm, scan, custom, other).

    ``ruled``: the node was made inside a module whose plan rule changes it (not a pass).
    """
    base = _base(node)
    forward_cls = getattr(type(node), "_forward_cls", None)
    if forward_cls is not None:  # a custom autograd.Function
        home = getattr(forward_cls, "__module__", "")
        # a rule's own function (lxt_plus's, or a user rule's inside the module it rules); one that
        # the model's code defines (YOSO's LSH kernels) is not covered by any rule
        if home.startswith("lxt_plus.") or (ruled and not home.startswith("transformers.")):
            return "rule", forward_cls.__name__
        return "custom", f"custom autograd function {forward_cls.__name__}"
    if base == "AccumulateGrad":
        return "leaf", base
    if _ATTENTION.search(base):
        return ("attention", base) if ruled else ("attention-unruled", "scaled_dot_product_attention")
    if base in _LINEAR:
        return "linear", base
    if base in _HOMOGENEOUS:
        return "homogeneous", base
    n = len(_deps(node))
    if base in _PRODUCTS:
        return ("linear", base) if n <= 1 else ("product", f"{base.lower()} of two input-dependent tensors")
    if base in ("LinalgSolveTriangular", "LinalgSolve", "TriangularSolve"):
        # solve(A, B) is linear in the right-hand side B while the matrix A is a constant
        # (DeltaNet's chunked scan with its keys and gates held constant), and not in A
        inputs = [f for f, _ in node.next_functions]
        a_constant = base == "TriangularSolve" and len(inputs) > 1 and inputs[1] is None
        a_constant = a_constant or (base != "TriangularSolve" and (not inputs or inputs[0] is None))
        return ("linear", base) if a_constant else ("other", f"{base.lower()} with an input-dependent matrix")
    if base == "Div":
        # DivBackward0's inputs are (numerator, denominator); a constant denominator is a scaling
        inputs = [f for f, _ in node.next_functions]
        if len(inputs) < 2 or inputs[1] is None:
            return "linear", base
        return "division", "division by an input-dependent tensor"
    return _kind_of(base), base.lower()


_CATS = frozenset(("cat", "concat", "concatenate", "stack", "hstack", "vstack"))
_ADDS = frozenset("add __add__ __radd__ __iadd__ add_ sub __sub__ __rsub__ __isub__ sub_".split())


class _Recorder(TorchFunctionMode):
    """Notes, for each autograd node a torch function creates, the module path running it."""

    def __init__(self, where: Callable[[], str]) -> None:
        super().__init__()
        self.where = where
        self.made: dict[Any, tuple[str, str]] = {}
        self.constants: set[Any] = set()  # nodes that add a non-zero input-independent tensor
        self.affine: set[Any] = set()  # batch norms in eval mode: affine maps with constant statistics

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if func is F.batch_norm and isinstance(out, Tensor) and out.grad_fn is not None:
            training = args[5] if len(args) > 5 else (kwargs or {}).get("training", False)
            if not training:
                self.affine.add(out.grad_fn)
        if name in _CATS and isinstance(out, Tensor) and out.grad_fn is not None and args:
            parts = args[0] if isinstance(args[0], (list, tuple)) else ()
            if any(
                isinstance(t, Tensor)
                and not t.requires_grad
                and t.is_floating_point()
                and bool((t != 0).any())
                for t in parts
            ):  # a learned token put beside the input's (CLIP's class embedding)
                self.constants.add(out.grad_fn)
        if name in _ADDS and isinstance(out, Tensor) and out.grad_fn is not None and len(args) >= 2:
            a, b = args[0], args[1]
            grads = [isinstance(t, Tensor) and t.requires_grad for t in (a, b)]
            if grads[0] != grads[1]:
                const = b if grads[0] else a
                if isinstance(const, (int, float)) and not isinstance(const, bool):
                    nonzero = const != 0  # GPT-OSS's ``(up + 1) * glu``
                else:
                    nonzero = (
                        isinstance(const, Tensor) and const.is_floating_point() and bool((const != 0).any())
                    )
                if nonzero:
                    self.constants.add(out.grad_fn)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            fn = getattr(t, "grad_fn", None) if isinstance(t, Tensor) else None
            if fn is not None and fn not in self.made:
                self.made[fn] = (getattr(func, "__name__", str(func)).strip("_"), self.where())
        return out


@contextlib.contextmanager
def _module_stack(model: nn.Module) -> Iterator[Callable[[], str]]:
    stack: list[str] = []

    def leave(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays
        if stack:
            stack.pop()

    hooks = []
    for path, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, p=path: stack.append(p)))
        hooks.append(m.register_forward_hook(leave, always_call=True))
    try:
        yield lambda: stack[-1] if stack else ""
    finally:
        for h in hooks:
            h.remove()


def _output_tensor(out: Any) -> Tensor | None:
    for name in ("logits", "logits_per_image", "last_hidden_state", "pooler_output"):
        t = getattr(out, name, None)
        if isinstance(t, Tensor):
            return t
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


def _saved_tensors(node: Any) -> list[Tensor]:
    """The tensors an autograd node keeps for its backward pass."""
    found: list[Tensor] = []
    names = [a for a in dir(node) if a.startswith("_saved_")]
    if getattr(type(node), "_forward_cls", None) is not None:
        names.append("saved_tensors")
    for name in names:
        try:
            value = getattr(node, name)
        except RuntimeError:  # freed, or not a tensor attribute
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        found.extend(t for t in items if isinstance(t, Tensor))
    return found


def _plain_tensors(t: Tensor) -> list[Tensor]:
    """``t``, or the plain tensors inside a wrapper subclass (quantized weights: data and scales)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    return [x for n in names for x in _plain_tensors(getattr(t, n))]


def storages(tensors: Iterable[Tensor]) -> set[int]:
    """The storage addresses of ``tensors`` (a wrapper subclass: those of the tensors inside it)."""
    return {x.untyped_storage().data_ptr() for t in tensors for x in _plain_tensors(t)}


def saved_memory(nodes: Iterable[Any], exclude: set[int], tokens: int) -> SavedMemory:
    """Bytes saved by ``nodes`` for a probe of ``tokens`` tokens, as :class:`SavedMemory`.

    Each storage counts once; storages in ``exclude`` (the model's weights) not at all. A tensor
    with two dimensions of length ``tokens`` (attention weights) counts per pair of tokens.
    """
    seen = set(exclude)
    linear = pairs = kept = 0
    for node in nodes:
        ours = type(node).__name__ == "_RuleAttentionBackward"  # weights kept up to a length
        for t in (x for saved in _saved_tensors(node) for x in _plain_tensors(saved)):
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or ptr == 0:
                continue
            seen.add(ptr)
            size = t.untyped_storage().nbytes()
            if tokens > 1 and sum(d == tokens for d in t.shape) >= 2:
                if ours:
                    kept += size
                else:
                    pairs += size
            else:
                linear += size
    tokens = max(tokens, 1)
    return SavedMemory(linear / tokens, pairs / tokens**2, kept / tokens**2)


def check_operations(
    model: nn.Module,
    run: Callable[[], Any],
    rule_at: Callable[[str], tuple[bool, frozenset[str]]],
    types: dict[str, str],
    zero_bias: bool = False,
    tokens: int = 0,
    weights: Iterable[int] = (),
) -> OpReport:
    """Run ``run()`` (the patched model on a probe input whose leaves require grad) and sort every
    operation between its output and the input leaves. ``rule_at(path)``: whether the plan's rule
    for the module at ``path`` changes it, and the kinds of operation that the rule of the nearest
    enclosing ruled module keeps on the path by definition (``Rule.covers``); ``types``: module path -> type name, for the messages.
    ``zero_bias``: the preset zeroes every bias to conserve exactly, so a non-zero constant added
    on the relevance path (one that is not a bias parameter) is a leak and is reported.
    ``tokens``: the probe's sequence length; when given, the report says how much memory the
    backward pass keeps per token (:func:`saved_memory`); ``weights``: storages that are weights
    although not the model's parameters (loaded by offload hooks), left out of that figure."""
    with _module_stack(model) as where:
        recorder = _Recorder(where)
        with torch.enable_grad(), recorder:
            out = run()
    target = _output_tensor(out)
    if target is None or target.grad_fn is None:
        return OpReport(checked=False, reason="the probe's output does not depend on the input")
    counts: Counter[str] = Counter()
    unknown: dict[tuple[str, str], OpFinding] = {}
    seen: set[Any] = set()
    stack: list[tuple[Any, str]] = [(target.grad_fn, "")]
    while stack:
        node, consumer_path = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        called, path = recorder.made.get(node, ("", consumer_path))
        ruled, covers = rule_at(path)
        kind, what = classify_node(node, ruled)
        if node in recorder.affine:
            kind, what = "linear", "batch_norm (eval: an affine map)"
        if kind in covers:
            kind = "rule"
        if zero_bias and kind == "linear" and node in recorder.constants:
            kind, what = (
                "constant",
                (
                    "concatenation of a non-zero constant (a learned token)"
                    if _base(node) in ("Cat", "Stack")
                    else "addition of a non-zero constant that is not a bias parameter"
                ),
            )
        if kind in ("linear", "homogeneous", "rule", "attention"):
            counts[kind] += 1
        elif kind != "leaf":
            fits_kind = "attention" if kind == "attention-unruled" else kind
            op = (
                called
                if called and kind not in ("product", "division", "scan", "custom", "constant")
                else what
            )
            key = (op, path)
            if key not in unknown:
                unknown[key] = OpFinding(
                    op, type(node).__name__, path, types.get(path, "?"), _FITS[fits_kind], fits_kind
                )
        stack.extend((f, path) for f in _deps(node))
    memory = None
    if tokens:
        exclude = storages((*model.parameters(), *model.buffers())) | set(weights)
        memory = saved_memory(seen, exclude, tokens)
    return OpReport(checked=True, counts=dict(counts), unknown=list(unknown.values()), memory=memory)
