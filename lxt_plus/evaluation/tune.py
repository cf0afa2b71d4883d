"""Search LRP rules for the most faithful explanations of one model (``lxt_plus.tune``).

The search space: the attention rule (AttnLRP or AH-LRP, Achtibat et al. 2024 / Ali et al. 2022,
and their positional variants ``pa-attnlrp`` / ``pa-ah-lrp``, Bakish et al. 2025), ε of the LRP-ε
rule on the linear layers, γ of the LRP-γ rule per layer group (embedding-side, middle and
head-side thirds of the layers, selected by ``name:`` globs on module paths), and mixed presets
with a different attention rule, or a different ε, per group. The objective is the mean ABPC
(:mod:`lxt_plus.evaluation.evaluate`) on the tuning inputs.

The search evaluates the base preset first, then walks the dimensions one at a time keeping the
best value of each (coordinate search), then tries random neighbours of the best until the
budget is spent. The result is never worse than the base on the tuning inputs.

Whether the gain is real: every trial keeps its per-sample scores, so ``folds`` cross-validates
the *selection* at no extra cost: on each fold the best of the evaluated candidates is chosen on
the other folds and its gain over the base measured on this one. ``held_out`` scores the chosen
preset on separate inputs, with a paired 95 % interval of the gain over the base.
"""

from __future__ import annotations

import fnmatch
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lxt_plus.engine.detect import ModuleInfo, detect_roles, find_block_list, require_module
from lxt_plus.engine.plan import Preset, get_preset
from lxt_plus.engine.rules import AHLRP, PAAHLRP, AttnLRP, Epsilon, Gamma, PAAttnLRP, Rule
from lxt_plus.errors import InputError, LxtPlusError, UnsupportedModelError
from lxt_plus.evaluation.evaluate import evaluate, token_rows

__all__ = [
    "tune",
    "TuneResult",
    "Trial",
    "Candidate",
    "layer_groups",
    "cross_validated_gain",
    "EPSILONS",
    "GAMMAS",
]

EPSILONS: tuple[float, ...] = (0.0, 1e-6, 1e-3, 1e-1)
"""ε of the LRP-ε rule on linear layers (absolute, in the units of the layer outputs), per layer
group; the linear layers outside the groups (the head) take the most common one."""
GAMMAS: tuple[float, ...] = (0.0, 0.05, 0.25)
"""γ of the LRP-γ rule per layer group; 0 keeps the ε-rule."""
_ATTENTION: dict[str, Rule] = {
    "attnlrp": AttnLRP(),
    "ah-lrp": AHLRP(),
    "pa-attnlrp": PAAttnLRP(),
    "pa-ah-lrp": PAAHLRP(),
}
GROUP_NAMES = ("embedding-side", "middle", "head-side")


# ------------------------------------------------------------------------------ layer groups
def _layer_list(model: nn.Module, infos: list[ModuleInfo]) -> tuple[str, int]:
    """Path and length of the list of transformer blocks (see :func:`~lxt_plus.engine.detect.find_block_list`)."""
    found = find_block_list(model, infos)
    if found is None:
        raise UnsupportedModelError(
            "tune() needs a transformer with a list of blocks (a ModuleList holding attention "
            "modules); none was found"
        )
    return found[0], len(found[1])


def _index_globs(indices: Sequence[int]) -> list[str]:
    """fnmatch globs matching exactly these layer indices: ``[0-9]`` style, one per leading prefix."""
    by_prefix: dict[str, list[str]] = {}
    for i in indices:
        s = str(i)
        by_prefix.setdefault(s[:-1], []).append(s[-1])
    return [p + (d[0] if len(d) == 1 else "[" + "".join(d) + "]") for p, d in by_prefix.items()]


def _selectors(infos: list[ModuleInfo], layers: str, indices: Sequence[int], role: str) -> list[str]:
    """``name:`` selectors that match exactly the modules of ``role`` in the given layers."""
    prefixes = tuple(f"{layers}.{i}." for i in indices)
    wanted = {i.path for i in infos if i.role == role and i.path.startswith(prefixes)}
    rels = sorted({p.split(".", layers.count(".") + 2)[-1] for p in wanted})
    globs = _index_globs(indices)

    def exact(patterns: list[str]) -> bool:
        hit = {
            i.path
            for i in infos
            if i.role != "container" and any(fnmatch.fnmatchcase(i.path, p) for p in patterns)
        }
        return hit == wanted

    short = list(
        dict.fromkeys(
            f"{layers}.{g}.{'*.' + r.rsplit('.', 1)[1] if '.' in r else r}" for g in globs for r in rels
        )
    )
    for patterns in (short, [f"{layers}.{g}.{r}" for g in globs for r in rels], sorted(wanted)):
        if exact(patterns):
            return [f"name:{p}" for p in patterns]
    raise AssertionError("explicit module paths always select exactly themselves")  # pragma: no cover


def layer_groups(model: nn.Module, n_groups: int = 3) -> list[tuple[str, list[int]]]:
    """``(name, layer indices)`` of the embedding-side, middle and head-side thirds of the blocks
    (fewer groups when the model has fewer blocks)."""
    _, n = _layer_list(model, detect_roles(model))
    parts = [p.tolist() for p in torch.arange(n).tensor_split(min(n_groups, n))]
    names = GROUP_NAMES if len(parts) == 3 else (GROUP_NAMES[0], GROUP_NAMES[2])[: len(parts)]
    return list(zip(names, parts, strict=True))


# ------------------------------------------------------------------------------ candidates
@dataclass(frozen=True)
class Candidate:
    """A point of the search space: attention rule, ε and γ per layer group."""

    attention: tuple[str, ...]
    eps: tuple[float, ...]
    gamma: tuple[float, ...]
    contrast: bool = False  # explain logit(target) - logit(runner-up) instead of the logit

    def describe(self, groups: Sequence[str]) -> str:
        parts = ["contrast=runner-up"] if self.contrast else []
        if len(set(self.attention)) == 1:
            parts.append(f"attention={self.attention[0]}")
        else:
            parts.append(
                "attention=" + ",".join(f"{g}:{a}" for g, a in zip(groups, self.attention, strict=True))
            )
        if len(set(self.eps)) == 1:
            parts.append(f"eps={self.eps[0]:g}")
        else:
            parts.append("eps=" + ",".join(f"{g}:{e:g}" for g, e in zip(groups, self.eps, strict=True)))
        if any(self.gamma):
            parts.append(
                "gamma=" + ",".join(f"{g}:{v:g}" for g, v in zip(groups, self.gamma, strict=True) if v)
            )
        return " ".join(parts)


class _Space:
    """Builds presets from candidates for one model (selectors resolved once)."""

    def __init__(
        self,
        model: nn.Module,
        base: Preset,
        epsilons: Sequence[float],
        gammas: Sequence[float],
        mixed: bool,
        attention: Sequence[str],
        contrast: bool = False,
    ) -> None:
        infos = detect_roles(model)
        layers, _ = _layer_list(model, infos)
        self.base, self.epsilons, self.gammas, self.mixed = base, tuple(epsilons), tuple(gammas), mixed
        self.groups = layer_groups(model)
        self.names = [g for g, _ in self.groups]
        self.linear = [_selectors(infos, layers, idx, "linear") for _, idx in self.groups]
        self.attn = [_selectors(infos, layers, idx, "attention") for _, idx in self.groups]
        rule = next((r for s, r in base.rules if s == "attention"), AttnLRP())
        first = rule.name if rule.name in _ATTENTION else "attnlrp"  # the base preset's attention rule
        unknown = [a for a in attention if a not in _ATTENTION]
        if unknown:
            raise InputError(f"unknown attention rule(s) {unknown}; tune() tries {', '.join(_ATTENTION)}")
        self.rules = tuple(dict.fromkeys((first, *attention)))
        self.contrast = contrast
        n = len(self.groups)
        self.start = Candidate((first,) * n, (0.0,) * n, (0.0,) * n)

    def preset(self, c: Candidate) -> Preset:
        if c == self.start:
            return self.base
        p = self.base
        major = max(set(c.attention), key=c.attention.count)
        if major != self.start.attention[0]:
            p = p.override("attention", _ATTENTION[major])
        eps = max(set(c.eps), key=c.eps.count)  # every linear layer, the head included
        if eps:
            p = p.override("linear", Epsilon(eps))
        for sels, e, g in zip(self.linear, c.eps, c.gamma, strict=True):
            if g or e != eps:  # γ (with the group's ε) or the group's own ε
                rule: Rule = Gamma(g, eps=max(e, 1e-9)) if g else Epsilon(e)
                for sel in sels:
                    p = p.override(sel, rule)
        for sels, a in zip(self.attn, c.attention, strict=True):
            for sel in sels if a != major else ():
                p = p.override(sel, _ATTENTION[a])
        return replace(p, name=f"{self.base.name}-tuned")

    def sweeps(self, c: Candidate) -> Iterator[list[Candidate]]:
        """One list of alternatives per dimension, each built on ``c`` (call again with the best)."""
        n = len(self.groups)
        yield [Candidate((a,) * n, c.eps, c.gamma, c.contrast) for a in self.rules if (a,) * n != c.attention]
        if self.contrast:
            yield [replace(c, contrast=not c.contrast)]
        yield [replace(c, eps=(e,) * n) for e in self.epsilons if (e,) * n != c.eps]
        for g in range(n):
            yield [
                replace(c, gamma=c.gamma[:g] + (v,) + c.gamma[g + 1 :])
                for v in self.gammas
                if v != c.gamma[g]
            ]
        if self.mixed and n > 1:
            yield [
                replace(c, attention=c.attention[:g] + (a,) + c.attention[g + 1 :])
                for g in range(n)
                for a in self.rules
                if a != c.attention[g]
            ]
            yield [
                replace(c, eps=c.eps[:g] + (e,) + c.eps[g + 1 :])
                for g in range(n)
                for e in self.epsilons
                if e != c.eps[g]
            ]

    def mutate(self, c: Candidate, rng: random.Random) -> Candidate:
        n = len(self.groups)
        dims = ["eps", "attention", "gamma"] + (["mixed", "mixed-eps"] if self.mixed and n > 1 else [])
        dims += ["contrast"] if self.contrast else []
        dim, g = rng.choice(dims), rng.randrange(n)
        if dim == "contrast":
            return replace(c, contrast=not c.contrast)
        if dim == "eps":
            return replace(c, eps=(rng.choice(self.epsilons),) * n)
        if dim == "mixed-eps":
            return replace(c, eps=c.eps[:g] + (rng.choice(self.epsilons),) + c.eps[g + 1 :])
        if dim == "gamma":
            return replace(c, gamma=c.gamma[:g] + (rng.choice(self.gammas),) + c.gamma[g + 1 :])
        if dim == "attention":
            return replace(c, attention=(rng.choice(self.rules),) * n)
        return replace(c, attention=c.attention[:g] + (rng.choice(self.rules),) + c.attention[g + 1 :])


# ------------------------------------------------------------------------------ result
@dataclass
class Trial:
    """One evaluated preset: its description, mean ABPC on the tuning inputs and the time it took."""

    description: str
    preset: Preset
    score: float
    seconds: float
    error: str | None = None
    rows: torch.Tensor | None = None  # ABPC per tuning sample


@dataclass
class TuneResult:
    """The best preset found by :func:`tune`, next to the base preset.

    Attributes
    ----------
    preset:
        The best preset (the base itself when nothing beat it).
    score, default_score:
        Mean ABPC of the best and of the base preset on the tuning inputs.
    held_out_score, default_held_out_score:
        The same on ``held_out`` (``None`` when none was given): compare to see overfitting.
    held_out_interval:
        95 % interval ``(low, high)`` of the paired per-sample gain over the base on ``held_out``.
    explain_contrast:
        ``"runner-up"`` when the best heatmaps explain ``logit(target) − logit(runner-up)``:
        pass the runner-up as ``contrast=`` to :func:`lxt_plus.explain` with :attr:`preset`.
    cv_gain, cv_interval:
        Cross-validated gain of the selection over the base on the tuning inputs (see the
        module docstring), with its 95 % interval; ``None`` without ``folds``.
    trials:
        Every evaluated candidate in search order (the base first).
    """

    preset: Preset
    score: float
    default: Preset
    default_score: float
    held_out_score: float | None = None
    default_held_out_score: float | None = None
    trials: list[Trial] = field(default_factory=list)
    description: str = ""
    seconds: float = 0.0
    held_out_interval: tuple[float, float] | None = None
    explain_contrast: str | None = None
    cv_gain: float | None = None
    cv_interval: tuple[float, float] | None = None

    def to_yaml(self) -> str:
        """The best preset as YAML (load it back with :func:`lxt_plus.load_preset`)."""
        return self.preset.to_yaml()

    def save(self, path: str) -> None:
        """Write the best preset to a ``.yaml`` file."""
        self.preset.save(path)

    def report(self) -> str:
        """A short text report: what changed, scores on the tuning and held-out inputs."""
        lines = [
            f"tune: {len(self.trials)} trials in {self.seconds:.0f} s; best: {self.description}",
            f"{'preset':<24} {'tuning ABPC':>12} {'held-out ABPC':>14}",
        ]

        def fmt(v: float | None) -> str:
            return "–" if v is None else f"{v:.4f}"

        lines.append(
            f"{self.default.name + ' (default)':<24} {fmt(self.default_score):>12} "
            f"{fmt(self.default_held_out_score):>14}"
        )
        lines.append(
            f"{self.preset.name + ' (tuned)':<24} {fmt(self.score):>12} {fmt(self.held_out_score):>14}"
        )
        if self.cv_gain is not None and self.cv_interval is not None:
            lo, hi = self.cv_interval
            lines.append(f"cross-validated gain of the selection: {self.cv_gain:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        if self.held_out_interval is not None and self.held_out_score is not None:
            lo, hi = self.held_out_interval
            gain = self.held_out_score - (self.default_held_out_score or 0.0)
            lines.append(f"held-out gain, paired: {gain:+.4f} [{lo:+.4f}, {hi:+.4f}] (95 % interval)")
        if self.preset is self.default:
            lines.append("no candidate beat the default preset on the tuning inputs")
        elif self.held_out_score is not None and self.default_held_out_score is not None:
            gain = self.held_out_score - self.default_held_out_score
            verdict = "carries over" if gain > 0 else "does not carry over (overfit to the tuning inputs)"
            lines.append(
                f"held-out gain {gain:+.4f} vs tuning gain {self.score - self.default_score:+.4f}: "
                f"the improvement {verdict}"
            )
        failed = [t for t in self.trials if t.error]
        if failed:
            lines.append(
                f"{len(failed)} candidate(s) failed, e.g. {failed[0].description}: {failed[0].error}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


# ------------------------------------------------------------------------------ tune
def tune(
    model: nn.Module,
    inputs: Any,
    *,
    tokenizer: Any = None,
    held_out: Any = None,
    base: str | Preset = "attnlrp",
    budget_trials: int = 20,
    budget_seconds: float | None = None,
    progress: bool = True,
    seed: int = 0,
    target: Any = None,
    steps: int = 10,
    epsilons: Sequence[float] = EPSILONS,
    gammas: Sequence[float] = GAMMAS,
    mixed: bool = True,
    attention: Sequence[str] = tuple(_ATTENTION),
    folds: int = 5,
    contrast: bool = False,
) -> TuneResult:
    """Search LRP rules that maximise the mean ABPC of the explanations on ``inputs``.

    Parameters
    ----------
    model:
        A HF transformer (causal LM or sequence classifier).
    inputs, held_out:
        Tuning inputs and optional held-out inputs, in any form :func:`lxt_plus.evaluation.evaluate.evaluate`
        accepts (texts need ``tokenizer``).
    base:
        The preset the search starts from; it is evaluated first, so the result is never worse
        than it on ``inputs``.
    budget_trials, budget_seconds:
        Stop after this many evaluated presets (the base included) or this many seconds, whichever
        comes first (the base is always evaluated).
    progress:
        Show a tqdm progress bar.
    seed:
        Seed of the random phase of the search.
    target, steps:
        Passed to :func:`~lxt_plus.evaluation.evaluate.evaluate`.
    epsilons, gammas:
        Values tried for ε on linear layers and γ per layer group (0: no γ-rule).
    mixed:
        Also try a different attention rule, and a different ε, in each layer group.
    attention:
        The attention rules tried (``"attnlrp"``, ``"ah-lrp"``, ``"pa-attnlrp"``, ``"pa-ah-lrp"``).
    folds:
        Folds of the cross-validated selection (``0`` or ``1``: none; at most one per sample).
    contrast:
        Also try heatmaps of ``logit(target) − logit(runner-up)`` (the natural foil: the other
        sentiment, the second most likely token), scored on the target's own logit.

    Returns
    -------
    TuneResult
        ``.preset`` (save with ``.save(path)``), ``.score`` vs ``.default_score``, ``.report()``.
    """
    from tqdm.auto import tqdm

    require_module(model, "tune")
    if budget_trials < 1:
        raise InputError(f"budget_trials must be >= 1, got {budget_trials}")
    start_time = time.perf_counter()
    space = _Space(model, get_preset(base), epsilons, gammas, mixed, attention, contrast)
    rows = token_rows(model, inputs, tokenizer)
    rng = random.Random(seed)
    scores: dict[Candidate, float] = {}
    per_row: dict[Candidate, torch.Tensor] = {}
    trials: list[Trial] = []
    bar = tqdm(total=budget_trials, desc="tuning LRP rules", disable=not progress)

    def out_of_budget() -> bool:
        over_time = budget_seconds is not None and time.perf_counter() - start_time > budget_seconds
        return len(trials) >= budget_trials or (over_time and bool(trials))

    def score(c: Candidate) -> float:
        if c in scores:
            return scores[c]
        preset, t0, error, values = space.preset(c), time.perf_counter(), None, None
        try:
            values = _row_abpc(model, rows, preset, target, steps, c.contrast)
            value = float(values.mean())
            per_row[c] = values
        except (LxtPlusError, RuntimeError, TypeError) as exc:
            value, error = -math.inf, f"{type(exc).__name__}: {exc}"
        scores[c] = value
        trials.append(Trial(c.describe(space.names), preset, value, time.perf_counter() - t0, error, values))
        bar.update()
        best_so_far = max(scores.values())
        bar.set_postfix(best=f"{best_so_far:.4f}")
        return value

    try:
        best = space.start
        score(best)
        n_dims = len(list(space.sweeps(best)))
        for _ in range(2):  # two coordinate passes, then random neighbours of the best
            for d in range(n_dims):
                for c in list(space.sweeps(best))[d]:
                    if out_of_budget():
                        break
                    if score(c) > scores[best]:
                        best = c
        stale = 0
        while not out_of_budget() and stale < 50:
            c = space.mutate(best, rng)
            if c in scores:
                stale += 1
                continue
            if score(c) > scores[best]:
                best = c
    finally:
        bar.close()
    result = TuneResult(
        space.preset(best),
        scores[best],
        space.base,
        scores[space.start],
        trials=trials,
        description=best.describe(space.names),
        explain_contrast="runner-up" if best.contrast else None,
    )
    if space.start in per_row and min(folds, len(rows)) >= 2:
        gains = cross_validated_gain(per_row, space.start, min(folds, len(rows)), seed)
        result.cv_gain, result.cv_interval = _interval(gains)
    if held_out is not None:
        held = token_rows(model, held_out, tokenizer)
        held_target = None if isinstance(target, (list, tuple)) else target
        base_rows = _row_abpc(model, held, space.base, held_target, steps)
        tuned_rows = (
            base_rows
            if best == space.start
            else _row_abpc(model, held, result.preset, held_target, steps, best.contrast)
        )
        result.default_held_out_score = float(base_rows.mean())
        result.held_out_score = float(tuned_rows.mean())
        result.held_out_interval = _interval(tuned_rows - base_rows)[1]
    result.seconds = time.perf_counter() - start_time
    return result


def cross_validated_gain(
    per_row: dict[Candidate, torch.Tensor], base: Candidate, folds: int, seed: int = 0
) -> torch.Tensor:
    """Per-sample gain of a cross-validated selection over ``base``: the samples are split into
    ``folds``; for each fold the candidate with the best mean on the other folds is chosen, and
    its score minus the base's is kept on this fold's samples."""
    n = len(per_row[base])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    gains = torch.zeros(n, dtype=torch.float64)
    for fold in order.tensor_split(folds):
        train = torch.ones(n, dtype=torch.bool)
        train[fold] = False
        chosen = max(per_row, key=lambda c: float(per_row[c][train].mean()))
        gains[fold] = (per_row[chosen][fold] - per_row[base][fold]).double()
    return gains


def _interval(values: torch.Tensor) -> tuple[float, tuple[float, float]]:
    """Mean and normal 95 % interval of the mean."""
    mean = float(values.mean())
    half = 1.96 * float(values.std()) / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return mean, (mean - half, mean + half)


def _row_abpc(
    model: nn.Module,
    rows: list[torch.Tensor],
    preset: Preset,
    target: Any,
    steps: int,
    contrast: bool = False,
) -> torch.Tensor:
    foil = "runner-up" if contrast else None
    report = evaluate(model, rows, {preset.name: preset}, target=target, steps=steps, explain_contrast=foil)
    return report[preset.name].abpc.double()
