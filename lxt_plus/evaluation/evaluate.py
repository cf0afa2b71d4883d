"""How faithful is an explanation? Perturbation curves, ABPC, AOPC and conservation.

Rank the real tokens by relevance and replace the input embeddings of the top-k % (MoRF, most
relevant first) or of the bottom-k % (LeRF, least relevant first) by zeros (or by the embedding of
a replacement token), for k = 0, 10, ..., 100, recording the target logit and probability
(Samek et al. 2017; the protocol of the AttnLRP paper, Achtibat et al. 2024). All perturbation
steps of one sample run as one batched forward pass.

Scores, per sample, then averaged:

- ABPC (area between the perturbation curves) ``= mean_k (LeRF_k − MoRF_k) / |logit_0|``:
  higher is better, a random ranking gives about 0.
- AOPC comprehensiveness (DeYoung et al. 2020, as in ferret) ``= mean_k (p_0 − p(top-k % removed))``
  for k = 10 … 100 %: higher is better.
- AOPC sufficiency ``= mean_k (p_0 − p(only the top-k % kept))``: lower is better.
- Conservation error of LRP ``= |Σ R − logit_0| / |logit_0|``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lxt_plus.api.explain import frozen_eval, model_kind, prepare_text, resolve_token
from lxt_plus.engine.detect import is_hf_model, require_module
from lxt_plus.engine.functional import acc
from lxt_plus.engine.plan import PRESETS, Preset, get_preset
from lxt_plus.errors import InputError, TargetError
from lxt_plus.evaluation.baselines import BASELINES, Method, embed, explain_with_preset, output_logits

__all__ = [
    "Curves",
    "MethodResult",
    "EvaluationReport",
    "evaluate",
    "perturbation_curves",
    "abpc",
    "aopc_comprehensiveness",
    "aopc_sufficiency",
    "resolve_method",
]

MethodSpec = str | Preset | Method


# ------------------------------------------------------------------------------ curves and scores
@dataclass
class Curves:
    """Perturbation curves of one sample; each tensor has shape ``(steps + 1,)``, index ``k`` is
    ``k / steps`` of the real tokens replaced (MoRF: most relevant first, LeRF: least relevant)."""

    morf_logit: Tensor
    lerf_logit: Tensor
    morf_prob: Tensor
    lerf_prob: Tensor


def _replacement_vector(model: nn.Module, replacement: Any, tokenizer: Any, like: Tensor) -> Tensor:
    if replacement is None:
        return torch.zeros_like(like[0, 0])
    if isinstance(replacement, Tensor) and replacement.is_floating_point():
        if replacement.shape != like.shape[-1:]:
            raise InputError(
                f"a replacement vector must have shape ({like.shape[-1]},), got {tuple(replacement.shape)}"
            )
        return replacement.to(like)
    if isinstance(replacement, str):
        if tokenizer is None:
            raise InputError(
                f"replacement={replacement!r} is a token string: pass tokenizer=... or a token id"
            )
        ids = tokenizer.encode(replacement, add_special_tokens=False)
        if len(ids) != 1:
            raise InputError(f"replacement {replacement!r} must be exactly one token, it is {len(ids)}")
        replacement = ids[0]
    if isinstance(replacement, bool) or not isinstance(replacement, int):
        raise InputError(
            f"replacement must be None (zeros), a token id, a token string or a vector, got {replacement!r}"
        )
    return embed(model, torch.tensor([[replacement]]))[0, 0].to(like)


def perturbation_curves(
    model: nn.Module,
    input_ids: Tensor,
    relevance: Tensor,
    target: int,
    *,
    steps: int = 10,
    replacement: Tensor | int | str | None = None,
    tokenizer: Any = None,
    chunk: int = 32,
    contrast: int | None = None,
) -> Curves:
    """MoRF and LeRF curves of one unpadded sequence, in one batched forward pass.

    Parameters
    ----------
    model:
        A model that accepts ``inputs_embeds=`` and has ``get_input_embeddings()``.
    input_ids:
        ``(seq,)`` the real tokens of one sample (no padding).
    relevance:
        ``(seq,)`` the attribution to test; ties keep the token order.
    target:
        Next-token id (causal LM, explained at the last token) or class index.
    steps:
        Number of perturbation steps; ``k / steps`` of the tokens are replaced at step ``k``.
    replacement:
        ``None`` (zero embedding), a token id or token string (its embedding) or a vector ``(d_model,)``.
    chunk:
        At most this many perturbed copies per forward pass.
    contrast:
        A foil's id: the logit curves follow ``logit(target) − logit(contrast)`` (the
        probability curves still follow the target).
    """
    ids = input_ids.reshape(-1)
    rel = relevance.reshape(-1).float().cpu()
    if rel.shape != ids.shape:
        raise InputError(f"relevance shape {tuple(rel.shape)} does not match input_ids {tuple(ids.shape)}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    x = embed(model, ids[None])  # (1, n, d)
    fill = _replacement_vector(model, replacement, tokenizer, x)
    n = ids.shape[0]
    order = torch.argsort(rel, descending=True, stable=True).to(x.device)
    least = torch.argsort(rel, descending=False, stable=True).to(x.device)
    # rows: MoRF k = 0 .. steps, then LeRF k = 1 .. steps - 1 (k = 0 and k = steps are shared)
    batch = x.repeat(2 * steps, 1, 1)
    for k in range(steps + 1):
        m = int(math.floor(k * n / steps + 0.5))
        batch[k, order[:m]] = fill
        if 0 < k < steps:
            batch[steps + k, least[:m]] = fill
    with frozen_eval(model), torch.no_grad():
        logits = torch.cat([acc(output_logits(model, part)) for part in batch.split(chunk)])
    logit = logits[:, target].double().cpu()
    if contrast is not None:
        logit = logit - logits[:, contrast].double().cpu()
    prob = torch.softmax(logits, -1)[:, target].double().cpu()
    lerf = [0, *range(steps + 1, 2 * steps), steps]
    return Curves(logit[: steps + 1], logit[lerf], prob[: steps + 1], prob[lerf])


def abpc(curves: Curves) -> float:
    """Area between the LeRF and MoRF logit curves, normalised by ``|logit_0|`` (higher is better)."""
    scale = max(abs(float(curves.morf_logit[0])), 1e-6)
    return float((curves.lerf_logit - curves.morf_logit).mean()) / scale


def aopc_comprehensiveness(curves: Curves) -> float:
    """Mean drop of the target probability when the top-k % are removed, k = 10 … 100 % (higher is better)."""
    return float((curves.morf_prob[0] - curves.morf_prob[1:]).mean())


def aopc_sufficiency(curves: Curves) -> float:
    """Mean drop of the target probability when only the top-k % are kept, k = 10 … 100 % (lower is
    better). Keeping the top-k % is removing the bottom (100 − k) %: read off the LeRF curve."""
    kept = curves.lerf_prob.flip(0)[1:]  # lerf at step steps - k, for k = 1 .. steps
    return float((curves.lerf_prob[0] - kept).mean())


# ------------------------------------------------------------------------------ report
@dataclass
class MethodResult:
    """Per-sample scores and curves of one method; tensors are ``(n_samples,)`` or
    ``(n_samples, steps + 1)`` for the curves. ``conservation`` is ``None`` for non-LRP methods."""

    name: str
    abpc: Tensor
    comprehensiveness: Tensor
    sufficiency: Tensor
    seconds: Tensor
    morf_logit: Tensor
    lerf_logit: Tensor
    morf_prob: Tensor
    lerf_prob: Tensor
    conservation: Tensor | None = None

    def summary(self) -> dict[str, float | None]:
        """Means over samples, and the standard error of the mean ABPC."""
        n = self.abpc.numel()
        se = float(self.abpc.std() / math.sqrt(n)) if n > 1 else float("nan")
        return {
            "abpc": float(self.abpc.mean()),
            "abpc_se": se,
            "comprehensiveness": float(self.comprehensiveness.mean()),
            "sufficiency": float(self.sufficiency.mean()),
            "conservation_error": None if self.conservation is None else float(self.conservation.mean()),
            "seconds": float(self.seconds.mean()),
        }


@dataclass
class EvaluationReport:
    """Faithfulness of several attribution methods on the same samples and targets.

    Attributes
    ----------
    results:
        Method name -> :class:`MethodResult`, in the order given.
    fractions:
        The perturbed share of tokens at each step, ``[0.0, 0.1, ..., 1.0]``.
    targets:
        The explained target id of each sample.
    replacement:
        What perturbed embeddings were replaced by.
    """

    results: dict[str, MethodResult]
    fractions: list[float]
    targets: list[int]
    replacement: str = "zeros"
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MethodResult:
        return self.results[name]

    @property
    def n_samples(self) -> int:
        return len(self.targets)

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Method name -> mean scores (see :meth:`MethodResult.summary`)."""
        return {name: r.summary() for name, r in self.results.items()}

    def best(self, metric: str = "abpc") -> str:
        """Name of the method with the highest mean ``metric`` (lowest for ``"sufficiency"``)."""
        sign = -1.0 if metric in ("sufficiency", "conservation_error", "seconds") else 1.0
        return max(self.results, key=lambda k: sign * (self.summary()[k][metric] or 0.0))

    def table(self, fmt: str = "markdown", digits: int = 3) -> str:
        """The mean scores as a markdown (``"markdown"``) or aligned plain-text (``"plain"``) table."""
        if fmt not in ("markdown", "plain"):
            raise InputError(f"fmt must be 'markdown' or 'plain', got {fmt!r}")
        head = [
            "method",
            "ABPC ↑",
            "± s.e.",
            "comprehensiveness ↑",
            "sufficiency ↓",
            "conservation err",
            "s / explanation",
        ]
        rows = []
        for name, s in self.summary().items():
            cons = s["conservation_error"]
            rows.append(
                [
                    name,
                    f"{s['abpc']:.{digits}f}",
                    f"{s['abpc_se']:.{digits}f}",
                    f"{s['comprehensiveness']:.{digits}f}",
                    f"{s['sufficiency']:.{digits}f}",
                    "–" if cons is None else f"{cons:.{digits}f}",
                    f"{s['seconds']:.3f}",
                ]
            )
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        if fmt == "plain":
            return "\n".join(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
                for r in [head, *rows]
            )
        line = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in [head, *rows]
        ]
        rule = (
            "|"
            + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths))
            + "|"
        )
        return "\n".join([line[0], rule, *line[1:]])

    def __str__(self) -> str:
        return self.table("plain")

    def plot(self, quantity: str = "logit", ax: Any = None) -> Any:
        """Mean MoRF (solid) and LeRF (dashed) curves per method; ``quantity`` is ``"logit"``
        (normalised by ``|logit_0|``) or ``"prob"``. Returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        if quantity not in ("logit", "prob"):
            raise InputError(f"quantity must be 'logit' or 'prob', got {quantity!r}")
        fig, ax = plt.subplots(figsize=(6, 4)) if ax is None else (ax.figure, ax)
        x = [100 * f for f in self.fractions]
        for i, (name, r) in enumerate(self.results.items()):
            morf, lerf = (r.morf_logit, r.lerf_logit) if quantity == "logit" else (r.morf_prob, r.lerf_prob)
            if quantity == "logit":
                scale = r.morf_logit[:, :1].abs().clamp_min(1e-6)
                morf, lerf = morf / scale, lerf / scale
            color = f"C{i % 10}"
            ax.plot(x, morf.mean(0), color=color, label=f"{name} (ABPC {float(r.abpc.mean()):.2f})")
            ax.plot(x, lerf.mean(0), color=color, linestyle="--")
        ax.set_xlabel("tokens replaced (%)  — solid: most relevant first, dashed: least relevant first")
        ax.set_ylabel("target logit / |logit at 0 %|" if quantity == "logit" else "target probability")
        ax.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and floats: summary, per-sample scores and curves."""
        out: dict[str, Any] = {
            "fractions": self.fractions,
            "targets": self.targets,
            "replacement": self.replacement,
            "meta": self.meta,
            "methods": {},
        }
        for name, r in self.results.items():
            out["methods"][name] = {
                "summary": r.summary(),
                **{
                    k: getattr(r, k).tolist()
                    for k in (
                        "abpc",
                        "comprehensiveness",
                        "sufficiency",
                        "seconds",
                        "morf_logit",
                        "lerf_logit",
                        "morf_prob",
                        "lerf_prob",
                    )
                },
                "conservation": None if r.conservation is None else r.conservation.tolist(),
            }
        return out


# ------------------------------------------------------------------------------ evaluate
def resolve_method(spec: MethodSpec, seed: int = 0) -> tuple[str, Method, Preset | None]:
    """``(name, method, preset or None)`` for a preset name or :class:`Preset`, a baseline name from
    :data:`lxt_plus.evaluation.baselines.BASELINES`, or a callable."""
    if isinstance(spec, Preset):
        return spec.name, _preset_call(spec), spec
    if isinstance(spec, str):
        key = spec.lower().replace("-", "_")
        if key in BASELINES:
            return spec, BASELINES[key](seed=seed), None
        try:
            preset = get_preset(spec)
        except LookupError:
            raise InputError(
                f"unknown method {spec!r}: use a preset ({', '.join(sorted(PRESETS))}), a baseline "
                f"({', '.join(BASELINES)}), a YAML preset path or a callable"
            ) from None
        return spec, _preset_call(preset), preset
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec, None
    raise InputError(f"a method is a preset name, a Preset, a baseline name or a callable, got {spec!r}")


def _preset_call(preset: Preset) -> Method:
    def method(model: nn.Module, ids: Tensor, mask: Tensor, targets: Tensor) -> Tensor:
        return explain_with_preset(model, ids, mask, targets, preset)[0]

    return method


def token_rows(model: nn.Module, inputs: Any, tokenizer: Any) -> list[Tensor]:
    """Unpadded ``(seq,)`` id tensors, one per sample."""
    if isinstance(inputs, str) or (
        isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs)
    ):
        if tokenizer is None:
            raise InputError("text inputs need tokenizer=...; or pass input_ids")

        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        ids, mask = prepare_text(tokenizer, texts, model if is_hf_model(model) else None)
        return [ids[r, mask[r].bool()] for r in range(ids.shape[0])]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return [t.reshape(-1) for t in inputs]
    mask = None
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(f"an input mapping needs 'input_ids', got keys {sorted(inputs)}")
        inputs, mask = inputs["input_ids"], inputs.get("attention_mask")
    if not isinstance(inputs, Tensor) or inputs.is_floating_point() or inputs.dim() not in (1, 2):
        raise InputError(
            "inputs must be text(s) with tokenizer=..., input_ids (seq,)/(batch, seq), a list of "
            f"id tensors or a tokenizer output, got {type(inputs).__name__}"
        )
    ids = inputs if inputs.dim() == 2 else inputs[None]
    mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
    rows = [ids[r, mask[r].bool()] for r in range(ids.shape[0])]
    if any(r.numel() == 0 for r in rows):
        raise InputError("a row of the batch has no real token (its attention_mask is all zeros)")
    return rows


def _target_id(model: nn.Module, spec: Any, logits: Tensor, tokenizer: Any) -> int:
    n_out = logits.shape[-1]
    if spec is None:
        return int(logits.argmax())
    if isinstance(spec, str):
        labels = {
            str(v).lower(): int(k)
            for k, v in (getattr(getattr(model, "config", None), "id2label", None) or {}).items()
        }

        if is_hf_model(model) and model_kind(model) == "classifier":
            if spec.lower() not in labels:
                raise TargetError(f"unknown target label {spec!r}; valid labels: {', '.join(labels)}")
            return labels[spec.lower()]
        ids, _ = resolve_token(tokenizer, spec, n_out)
        if len(ids) != 1:  # the curves follow one logit; explain() would sum several
            pieces = (
                tokenizer.convert_ids_to_tokens(list(ids))
                if hasattr(tokenizer, "convert_ids_to_tokens")
                else ids
            )
            raise TargetError(
                f"evaluate follows one token's logit, but target {spec!r} splits into {len(ids)} "
                f"tokens {pieces}; pass one of them, or its token id"
            )
        return ids[0]
    if isinstance(spec, bool) or not isinstance(spec, int) or not -n_out <= spec < n_out:
        raise TargetError(
            f"target must be an output index in 0..{n_out - 1} or a token/label string, got {spec!r}"
        )
    return spec % n_out


def _foil_id(model: nn.Module, spec: Any, logits: Tensor, target: int, tokenizer: Any) -> int:
    """The foil of one sample: ``"runner-up"`` is the most likely output other than the target."""
    if spec == "runner-up":
        others = logits.detach().clone()
        others[target] = -math.inf
        return int(others.argmax())
    foil = _target_id(model, spec, logits, tokenizer)
    if foil == target:
        raise TargetError(f"the contrast {spec!r} is the target itself (id {target})")
    return foil


@contextlib.contextmanager
def _progress(total: int, enabled: bool, desc: str) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def evaluate(
    model: nn.Module,
    inputs: Any,
    methods: Mapping[str, MethodSpec] | Sequence[MethodSpec],
    *,
    tokenizer: Any = None,
    target: Any = None,
    steps: int = 10,
    replacement: Tensor | int | str | None = None,
    seed: int = 0,
    progress: bool = False,
    warmup: bool = False,
    contrast: Any = None,
    explain_contrast: Any = None,
) -> EvaluationReport:
    """Measure the faithfulness of attribution methods with perturbation curves.

    Parameters
    ----------
    model:
        A HF causal LM or sequence classifier, or any module with ``get_input_embeddings()`` that
        accepts ``inputs_embeds=`` and returns ``(batch, n_out)`` or ``(batch, seq, vocab)`` logits.
    inputs:
        Texts (with ``tokenizer``), ``input_ids`` ``(seq,)``/``(batch, seq)``, a tokenizer output with
        ``attention_mask`` (padding is stripped: it is never perturbed), or a list of id tensors.
    methods:
        A list of method specs or a mapping name -> spec. A spec is a preset (``"attnlrp"``,
        ``"ah-lrp"``, ``"gradient"``, a YAML path, a :class:`~lxt_plus.engine.plan.Preset`), a baseline
        (``"integrated_gradients"``, ``"attention_rollout"``, ``"last_layer_attention"``,
        ``"random"``) or a callable ``(model, input_ids, attention_mask, target_ids) -> (batch, seq)``.
    target:
        ``None`` (the model's prediction on the unperturbed input), a token id / token string /
        class index / label name, or a list with one per sample. The same target is used by every
        method and at every perturbation step.
    steps:
        ``k / steps`` of the real tokens are replaced at step ``k = 0 … steps``.
    replacement:
        ``None`` for zero embeddings, or a token id / token string / vector whose embedding replaces them.
    seed:
        Seed of the ``"random"`` baseline.
    contrast:
        A foil: ``"runner-up"`` (the second most likely token or class on the unperturbed input),
        a token id / token string / class index / label name, or a list with one per sample.
        Methods then explain ``logit(target) − logit(foil)``, and the curves follow that difference
        (the probability curves still follow the target). A method given as a function explains
        it as ``f(target) − f(foil)``, which is exact for methods linear in the output (gradients,
        integrated gradients, LRP).
    explain_contrast:
        The same foils, but for the explanation only: the curves follow the target's own logit.
        This asks whether a contrastive heatmap ranks the tokens of the plain prediction better
        (one of the dimensions :func:`~lxt_plus.evaluation.tune.tune` searches).
    progress:
        Show a tqdm progress bar.
    warmup:
        Run each method once on the first sample before timing (plan building, lazy imports and
        first-call allocations then do not count in the seconds per explanation).

    Returns
    -------
    EvaluationReport
        ``.table()``, ``.plot()``, ``.summary()``, ``.to_dict()``.
    """
    require_module(model, "evaluate")
    items = list(methods.items()) if isinstance(methods, Mapping) else [(None, m) for m in methods]
    if not items:
        raise InputError("no methods to evaluate")
    resolved = []
    for name, spec in items:
        auto, fn, preset = resolve_method(spec, seed)
        resolved.append((name or auto, fn, preset))
    if len({n for n, _, _ in resolved}) != len(resolved):
        raise InputError(
            f"duplicate method names {[n for n, _, _ in resolved]}: pass a mapping name -> method"
        )
    rows = token_rows(model, inputs, tokenizer)
    specs = target if isinstance(target, (list, tuple)) else [target] * len(rows)
    if len(specs) != len(rows):
        raise TargetError(f"{len(specs)} targets given for {len(rows)} samples")
    if contrast is not None and explain_contrast is not None:
        raise InputError(
            "give contrast= (explained and scored) or explain_contrast= (explained only), not both"
        )
    foil_spec = contrast if contrast is not None else explain_contrast
    foils = foil_spec if isinstance(foil_spec, (list, tuple)) else [foil_spec] * len(rows)
    if len(foils) != len(rows):
        raise TargetError(f"{len(foils)} contrast targets given for {len(rows)} samples")
    records: dict[str, dict[str, list[Any]]] = {n: {} for n, _, _ in resolved}
    targets: list[int] = []
    with _progress(len(rows) * len(resolved), progress, "evaluating") as bar:
        for i, (ids, spec) in enumerate(zip(rows, specs, strict=True)):
            with frozen_eval(model), torch.no_grad():
                clean = output_logits(model, embed(model, ids[None])).float()[0]
            t = _target_id(model, spec, clean, tokenizer)
            targets.append(t)
            f = None if foils[i] is None else _foil_id(model, foils[i], clean, t, tokenizer)
            tid, mask = torch.tensor([t]), torch.ones_like(ids)[None]
            fid = None if f is None else torch.tensor([f])
            for name, fn, preset in resolved:
                if warmup and i == 0:
                    fn(model, ids[None], mask, tid)
                start = time.perf_counter()
                if preset is not None:
                    rel, cons = explain_with_preset(model, ids[None], mask, tid, preset, fid)
                else:
                    rel, cons = fn(model, ids[None], mask, tid), None
                    if fid is not None:
                        rel = torch.as_tensor(rel) - torch.as_tensor(fn(model, ids[None], mask, fid))
                seconds = time.perf_counter() - start
                rel = torch.as_tensor(rel).detach().reshape(-1).float().cpu()
                if rel.numel() != ids.numel():
                    raise InputError(
                        f"method {name!r} returned {rel.numel()} relevance values for "
                        f"{ids.numel()} tokens; expected shape (batch, seq)"
                    )
                if not torch.isfinite(rel).all():
                    raise InputError(f"method {name!r} returned NaN or inf relevance")
                c = perturbation_curves(
                    model,
                    ids,
                    rel,
                    t,
                    steps=steps,
                    replacement=replacement,
                    tokenizer=tokenizer,
                    contrast=f if contrast is not None else None,
                )
                rec = records[name]
                for key, value in (
                    ("abpc", abpc(c)),
                    ("comprehensiveness", aopc_comprehensiveness(c)),
                    ("sufficiency", aopc_sufficiency(c)),
                    ("seconds", seconds),
                    ("morf_logit", c.morf_logit),
                    ("lerf_logit", c.lerf_logit),
                    ("morf_prob", c.morf_prob),
                    ("lerf_prob", c.lerf_prob),
                    ("conservation", None if cons is None else float(cons.reshape(-1)[0])),
                ):
                    rec.setdefault(key, []).append(value)
                bar.update()
    results = {}
    for name, _, _ in resolved:
        rec = records[name]
        conservation = rec["conservation"]
        results[name] = MethodResult(
            name=name,
            **{k: torch.tensor(rec[k]) for k in ("abpc", "comprehensiveness", "sufficiency", "seconds")},
            **{k: torch.stack(rec[k]) for k in ("morf_logit", "lerf_logit", "morf_prob", "lerf_prob")},
            conservation=None if any(v is None for v in conservation) else torch.tensor(conservation),
        )
    what = (
        "zeros"
        if replacement is None
        else (f"token {replacement!r}" if not isinstance(replacement, Tensor) else "vector")
    )
    return EvaluationReport(
        results,
        [k / steps for k in range(steps + 1)],
        targets,
        what,
        {"model": type(model).__name__, "steps": steps},
    )
