"""Cost of ``explain_generation`` against one ``explain`` call per generated token, on SmolLM2.

``explain_generation`` runs one forward pass over prompt + continuation and batched backward
passes through that shared graph; the naive way runs ``explain`` (one forward + one backward)
once per generated token on the growing sequence. Printed ratios (lower is better):

* ``attribution / (n × single)``: ``explain_generation`` with the continuation given, divided by
  the number of generated tokens times one ``explain`` at the mean length;
* ``with generation / (n × single)``: the same including the greedy ``generate`` call;
* ``attribution / loop``: against the measured per-token loop.

Run: ``python benchmarks/generation.py [--new-tokens 16] [--repeats 3] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import lxt_plus
from lxt_plus.demo import load_smollm2

PROMPT = "The Eiffel Tower was built in 1889 for the World's Fair in Paris. It became famous because"


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rules", default="attnlrp")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    gen = lxt_plus.explain_generation(model, tokenizer, PROMPT, args.new_tokens, rules=args.rules)
    ids, n_p = gen.token_ids, gen.prompt_length
    n = len(ids) - n_p
    print(
        f"SmolLM2-135M-Instruct, {torch.get_num_threads()} threads, preset {args.rules}: "
        f"{n_p} prompt tokens, {n} generated: {gen.text!r}"
    )
    cont = ids[n_p:]
    mid = n_p + n // 2

    def attribution() -> object:
        return lxt_plus.explain_generation(model, tokenizer, ids[:n_p], continuation=cont, rules=args.rules)

    def with_generation() -> object:
        return lxt_plus.explain_generation(model, tokenizer, ids[:n_p], args.new_tokens, rules=args.rules)

    def single() -> object:
        return lxt_plus.explain(model, ids[:mid], target=int(ids[mid]), rules=args.rules)

    def loop() -> object:
        return [
            lxt_plus.explain(model, ids[: n_p + t], target=int(ids[n_p + t]), rules=args.rules)
            for t in range(n)
        ]

    t_attr = timed(attribution, args.repeats)
    t_gen = timed(with_generation, args.repeats)
    t_single = timed(single, args.repeats)
    t_loop = timed(loop, max(1, args.repeats // 2))
    print(f"explain_generation (continuation given) {t_attr:8.3f} s")
    print(f"explain_generation (with generate)      {t_gen:8.3f} s")
    print(f"single explain at {mid} tokens            {t_single:8.3f} s")
    print(f"loop of {n} explain calls                 {t_loop:8.3f} s")
    print(f"ratio attribution / (n x single)        {t_attr / (n * t_single):8.3f}")
    print(f"ratio with generation / (n x single)    {t_gen / (n * t_single):8.3f}")
    print(f"ratio attribution / loop                {t_attr / t_loop:8.3f}")


if __name__ == "__main__":
    main()
