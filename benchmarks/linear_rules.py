"""Cost of the Linear-layer rules, as ratios against plain Gradient×Input measured in the same run.

One ``nn.Linear(576, 1536)`` (a SmolLM2 MLP projection) on a ``(1, 512, 576)`` input, forward and
input-gradient backward, one CPU thread. The rules run round-robin for ``--repeats`` rounds; each
ratio is taken within a round (rule ÷ plain, seconds apart) and the table gives the median of the
per-round ratios. Usage: ``python benchmarks/linear_rules.py [--repeats 15]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import lxt_plus
from lxt_plus.engine import rules as R

RULES: dict[str, R.Rule | None] = {
    "plain": None,
    "epsilon (ε=1e-6)": R.Epsilon(eps=1e-6),
    "gamma (generalised)": R.Gamma(),
    "gamma (original)": R.Gamma(generalized=False),
    "zplus": R.ZPlus(),
    "alpha-beta (2, 1)": R.AlphaBeta(),
    "flat": R.Flat(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear_rules.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(576, 1536)).requires_grad_(False)
    x = torch.randn(1, 512, 576)

    def step(name: str) -> float:
        rule = RULES[name]
        preset = "gradient" if rule is None else lxt_plus.get_preset("gradient").override("linear", rule)
        with lxt_plus.patched(layer, preset):
            leaf = x.clone().requires_grad_(True)
            start = time.perf_counter()
            torch.autograd.grad(layer(leaf).sum(), leaf)
            return time.perf_counter() - start

    for name in RULES:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in RULES}
    for _ in range(args.repeats):
        for name in RULES:
            times[name].append(step(name))
    lines = [
        f"nn.Linear(576, 1536), input (1, 512, 576), forward + input backward, 1 CPU thread, torch "
        f"{torch.__version__}; {args.repeats} interleaved rounds, median of per-round ratios.",
        "",
        "| rule | median ms | ÷ plain Gradient×Input |",
        "|---|---:|---:|",
    ]
    for name, ts in times.items():
        ratio = statistics.median(t / p for t, p in zip(ts, times["plain"], strict=True))
        lines.append(f"| {name} | {1e3 * statistics.median(ts):.1f} | {ratio:.2f}× |")
    table = "\n".join(lines)
    print(table)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
