"""Speed and memory of ``explain`` on SmolLM2-135M, as ratios against baselines measured in the same run.

For each sequence length (256, 1024) and attention implementation (eager, sdpa) it measures, each in
a fresh subprocess (so peak memory is clean):

- ``forward``: plain no-grad forward (all logits, as a user would call the model);
- ``gxi``: plain Gradient×Input with no rules (``rules="gradient"``: same inputs, one backward);
- ``naive-gxi``: what a user writes by hand: forward on ``inputs_embeds`` with all logits and
  trainable weights, then ``backward()`` (weight gradients computed);
- ``attnlrp`` / ``ah-lrp``: ``lxt_plus.explain``.

It prints time ratios (explain ÷ forward, explain ÷ gxi) and peak memory above the loaded model.
Usage: ``python benchmarks/explain_speed.py [--lengths 256 1024] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("forward", "gxi", "naive-gxi", "attnlrp", "ah-lrp")


def run_one(method: str, length: int, impl: str, repeats: int) -> dict[str, float]:
    import lxt_plus
    from lxt_plus.models import load_smollm2

    torch.manual_seed(0)
    model, _ = load_smollm2()  # de-quantised from the GGUF file to float32
    model.set_attn_implementation(impl)
    ids = torch.randint(100, 40000, (1, length))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def once() -> None:
        if method == "forward":
            with torch.no_grad():
                model(ids)
        elif method == "naive-gxi":
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            out = model(inputs_embeds=emb).logits
            out[0, -1].max().backward()
            _ = (emb * emb.grad).sum(-1)
            model.zero_grad(set_to_none=True)
        else:
            lxt_plus.explain(model, ids, rules="gradient" if method == "gxi" else method)

    once()  # warm-up (and the one-time plan validation for explain)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "peak_mb": max(peak - base_rss, 0) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--impls", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "explain_speed.md"))
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "LENGTH", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, length, impl = args.child
        print(json.dumps(run_one(method, int(length), impl, args.repeats)))
        return
    rows = []
    for length in args.lengths:
        for impl in args.impls:
            res = {}
            for method in METHODS:
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", method, str(length), impl]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                res[method] = json.loads(out.strip().splitlines()[-1])
                print(f"  {length:5d} {impl:5s} {method:9s} {res[method]['seconds']:.3f}s "
                      f"peak +{res[method]['peak_mb']:.0f} MB", flush=True)
            rows.append((length, impl, res))
    lines = [
        f"SmolLM2-135M (float32), {torch.get_num_threads()} CPU threads, torch {torch.__version__}; median of "
        f"{args.repeats} runs; memory = peak RSS above the loaded model.",
        "",
        "| tokens | attention | forward s | explain (attnlrp) s | ÷ forward | ÷ plain GxI | ah-lrp ÷ forward "
        "| naive GxI ÷ forward | peak MB forward / GxI / attnlrp / naive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for length, impl, r in rows:
        f, g, a, h, n = (r[m]["seconds"] for m in ("forward", "gxi", "attnlrp", "ah-lrp", "naive-gxi"))
        mem = " / ".join(f"{r[m]['peak_mb']:.0f}" for m in ("forward", "gxi", "attnlrp", "naive-gxi"))
        lines.append(f"| {length} | {impl} | {f:.3f} | {a:.3f} | {a / f:.2f}× | {a / g:.3f}× | {h / f:.2f}× "
                     f"| {n / f:.2f}× | {mem} |")
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
