"""Speed and memory of ``explain`` on SmolLM2-135M, as ratios against baselines measured in the same run.

For each sequence length (256, 1024) and attention implementation (eager, sdpa):

- ``forward``: plain no-grad forward, all logits (``model(ids)``, as a user calls the model);
- ``forward-last``: no-grad forward computing only the last position's logits (``logits_to_keep=1``),
  the stricter baseline, since ``explain`` computes only the logits it targets;
- ``gxi``: plain Gradient×Input with no rules (``rules="gradient"``: same inputs, one backward);
- ``naive-gxi``: what a user writes by hand: forward on ``inputs_embeds`` with all logits and
  trainable weights, then ``backward()`` (weight gradients computed);
- ``attnlrp`` / ``cp-lrp`` / ``ah-lrp``: ``lxt_plus.api.explain``.

Timing: one process per (length, attention) loads the model once, warms every method up, then
runs them round-robin ``--repeats`` times. Each ratio is taken within a round (the two methods ran
seconds apart, so drift in a shared machine's speed hits both) and the table gives the median of
those per-round ratios with their quartiles. Memory: a fresh process per method runs it once and
reports peak RSS above the loaded model.
Usage: ``python benchmarks/explain_speed.py [--lengths 256 1024] [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

METHODS = ("forward", "forward-last", "gxi", "naive-gxi", "attnlrp", "cp-lrp", "ah-lrp")


def _setup(length: int, impl: str) -> dict[str, Callable[[], None]]:
    import lxt_plus
    from lxt_plus.demo import load_smollm2

    torch.manual_seed(0)
    model, _ = load_smollm2()  # de-quantised from the GGUF file to float32
    model.set_attn_implementation(impl)
    with torch.no_grad():  # page in the memory-mapped weights, so that RSS counts activations only
        for p in model.parameters():
            p.sum()
    ids = torch.randint(100, 40000, (1, length))

    def forward() -> None:
        with torch.no_grad():
            model(ids)

    def forward_last() -> None:
        with torch.no_grad():
            model(ids, logits_to_keep=1)

    def naive_gxi() -> None:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb).logits
        out[0, -1].max().backward()
        _ = (emb * emb.grad).sum(-1)
        model.zero_grad(set_to_none=True)

    def explainer(rules: str) -> Callable[[], None]:
        return lambda: lxt_plus.explain(model, ids, rules=rules)

    methods = {
        "forward": forward,
        "forward-last": forward_last,
        "gxi": explainer("gradient"),
        "naive-gxi": naive_gxi,
        "attnlrp": explainer("attnlrp"),
        "cp-lrp": explainer("cp-lrp"),
        "ah-lrp": explainer("ah-lrp"),
    }
    return methods


def time_all(length: int, impl: str, repeats: int) -> dict[str, list[float]]:
    """Seconds per method and round. Each round runs every method once, in a rotated order."""
    methods = _setup(length, impl)
    for fn in methods.values():
        fn()  # warm-up (and the one-time plan validation for explain)
    times: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for r in range(repeats):
        for m in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            t0 = time.perf_counter()
            methods[m]()
            times[m].append(time.perf_counter() - t0)
    return times


def paired(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratio ``num / den``.

    Both ran in the same round, seconds apart, so a slow stretch of a shared machine hits both
    rather than only one of two medians taken at different times.
    """
    ratios = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return med, q1, q3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_memory(method: str, length: int, impl: str) -> float:
    """Peak resident memory above the loaded model while ``method`` runs once, sampled every ms.

    ``ru_maxrss`` would not do: loading the GGUF file peaks higher than a short run.
    """
    methods = _setup(length, impl)
    base = _rss_bytes()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    methods[method]()
    done.set()
    sampler.join()
    return max(peak, _rss_bytes()) / 2**20 - base / 2**20


def _child(*args: str) -> Any:
    cmd = [sys.executable, __file__, "--child", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "explain_speed.md"))
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "time":
            print(json.dumps(time_all(int(rest[0]), rest[1], int(rest[2]))))
        else:
            print(json.dumps(peak_memory(rest[0], int(rest[1]), rest[2])))
        return
    rows = []
    for length in args.lengths:
        for impl in args.impls:
            times = _child("time", str(length), impl, str(args.repeats))
            mem = {m: _child("memory", m, str(length), impl) for m in METHODS}
            for m in METHODS:
                print(
                    f"  {length:5d} {impl:5s} {m:12s} {statistics.median(times[m]):.3f}s  "
                    f"peak +{mem[m]:.0f} MB",
                    flush=True,
                )
            rows.append((length, impl, times, mem))
    lines = [
        f"SmolLM2-135M (float32), {torch.get_num_threads()} CPU threads, torch {torch.__version__}; "
        f"{args.repeats} interleaved rounds. Ratios: median of the per-round ratios [quartiles]; "
        "memory: peak RSS above the loaded model (sampled every ms, one run in a fresh process).",
        "",
        "| tokens | attention | forward s | attnlrp s | attnlrp ÷ forward | attnlrp ÷ plain GxI "
        "| cp-lrp ÷ forward | cp-lrp ÷ plain GxI "
        "| ah-lrp ÷ forward | ah-lrp ÷ plain GxI | plain GxI ÷ forward | attnlrp ÷ last-logit forward "
        "| naive GxI ÷ forward | peak MB forward / GxI / attnlrp / cp-lrp / ah-lrp / naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(times: dict[str, list[float]], num: str, den: str) -> str:
        med, q1, q3 = paired(times, num, den)
        return f"{med:.2f}× [{q1:.2f}–{q3:.2f}]"

    for length, impl, t, mem in rows:
        peaks = " / ".join(
            f"{mem[m]:.0f}" for m in ("forward", "gxi", "attnlrp", "cp-lrp", "ah-lrp", "naive-gxi")
        )
        lines.append(
            f"| {length} | {impl} | {statistics.median(t['forward']):.3f} | {statistics.median(t['attnlrp']):.3f} "
            f"| {cell(t, 'attnlrp', 'forward')} | {cell(t, 'attnlrp', 'gxi')} | {cell(t, 'cp-lrp', 'forward')} "
            f"| {cell(t, 'cp-lrp', 'gxi')} | {cell(t, 'ah-lrp', 'forward')} "
            f"| {cell(t, 'ah-lrp', 'gxi')} | {cell(t, 'gxi', 'forward')} | {cell(t, 'attnlrp', 'forward-last')} "
            f"| {cell(t, 'naive-gxi', 'forward')} | {peaks} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
