"""Ground-truth attribution on SmolLM2-135M-Instruct: tasks whose source tokens are known by construction.

Perturbation scores (ABPC) reward the method that matches the perturbation; here the right answer
is built into the prompt:

- **retrieval**: five lines "<Colour>: <digit>" then "<Colour>: " for one of them; the target is
  that colour's digit, the source is its line (the other lines are distractors of the same form);
- **induction**: a sequence of ten random common words shown twice, then its first five again;
  the target is the sixth word, and the source is that word's earlier occurrences (the copy
  sources);
- **agreement**: "The <plural noun> near the <singular noun> <verb>"; the target is the contrast
  ``logit(" are") - logit(" is")``, and the source is the plural subject (the singular noun next
  to the verb is the distractor).

Each method's token relevance is scored on the context (the tokens before the question part):
**top-1**: the token with the largest relevance lies in the source span; **mass**: the source
span's relevance over the context's total |relevance|. Methods: AttnLRP, CP-LRP, AH-LRP, plain
Gradient×Input and Integrated Gradients (16 steps from the zero embedding). Written to
``benchmarks/results/ground_truth.md``.

    python benchmarks/ground_truth.py [--examples 24]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
from pathlib import Path
from typing import Any

import torch
from _provenance import code_version  # this folder is on the path when the script runs

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["attnlrp", "cp-lrp", "ah-lrp", "pa-attnlrp", "pa-ah-lrp", "gradient", "integrated_gradients"]
KEYS = ["Blue", "Red", "Green", "Silver", "Yellow", "Black", "White", "Orange"]
WORDS = (
    "apple river stone window garden music paper silver forest candle island pocket rabbit "
    "bottle ladder mirror pencil carpet orange basket thunder button"
).split()
PLURALS = ["keys", "dogs", "books", "players", "letters", "flowers", "students", "boxes"]
SINGULARS = ["cabinet", "house", "table", "teacher", "garden", "window", "bridge", "road"]


def _enc(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def retrieval(tokenizer: Any, rng: random.Random) -> dict[str, Any]:
    keys = rng.sample(KEYS, 5)
    codes = [rng.randrange(1, 10) for _ in keys]
    asked = rng.randrange(5)
    ids: list[int] = []
    spans = []
    for i, (key, code) in enumerate(zip(keys, codes, strict=True)):
        start = len(ids)
        ids += _enc(tokenizer, f"{key}: {code}\n")
        if i == asked:
            spans.append((start, len(ids)))
    context = len(ids)
    # SmolLM2 writes " 4" as a space token, then the digit: the prompt ends with the space
    ids += _enc(tokenizer, f"{keys[asked]}:") + _enc(tokenizer, " ")
    return {
        "ids": ids,
        "context": context,
        "source": spans,
        "target": _enc(tokenizer, str(codes[asked]))[-1],
        "contrast": None,
    }


def induction(tokenizer: Any, rng: random.Random) -> dict[str, Any]:
    words = rng.sample(WORDS, 10)
    ids: list[int] = []
    spans = []
    for _ in range(2):
        for i, w in enumerate(words):
            start = len(ids)
            ids += _enc(tokenizer, " " + w)
            if i == 5:
                spans.append((start, len(ids)))
        ids += _enc(tokenizer, "\n")
    context = len(ids)
    for w in words[:5]:
        ids += _enc(tokenizer, " " + w)
    return {
        "ids": ids,
        "context": context,
        "source": spans,
        "target": _enc(tokenizer, " " + words[5])[0],
        "contrast": None,
    }


def agreement(tokenizer: Any, rng: random.Random) -> dict[str, Any]:
    plural, singular = rng.choice(PLURALS), rng.choice(SINGULARS)
    head = _enc(tokenizer, "The")
    subject = _enc(tokenizer, f" {plural}")
    rest = _enc(tokenizer, f" near the old {singular}")
    ids = head + subject + rest
    source = [(len(head), len(head) + len(subject))]
    are, is_ = _enc(tokenizer, " are")[0], _enc(tokenizer, " is")[0]
    return {"ids": ids, "context": len(ids), "source": source, "target": are, "contrast": is_}


TASKS = {"retrieval": retrieval, "induction": induction, "agreement": agreement}


def attribute(model: Any, method: str, task: dict[str, Any]) -> torch.Tensor:
    import lxt_plus
    from lxt_plus.evaluation.baselines import integrated_gradients

    ids = torch.tensor([task["ids"]])
    if method == "integrated_gradients":
        mask = torch.ones_like(ids)
        if task["contrast"] is None:
            return integrated_gradients(
                model, ids, mask, torch.tensor([task["target"]]), steps=16, batch_size=8
            )[0]
        on = integrated_gradients(model, ids, mask, torch.tensor([task["target"]]), steps=16, batch_size=8)[0]
        off = integrated_gradients(
            model, ids, mask, torch.tensor([task["contrast"]]), steps=16, batch_size=8
        )[0]
        return on - off  # IG is linear in the output: the contrast's attribution is the difference
    exp = lxt_plus.explain(model, ids, target=task["target"], contrast=task["contrast"], rules=method)
    return exp.relevance.reshape(-1)


def score(rel: torch.Tensor, task: dict[str, Any]) -> tuple[bool, float, bool, float]:
    """Top-1 hit and source mass; the same top-1 with the first token set aside (the attention
    sink, which rules that hold attention weights constant hand much relevance); and the first
    token's share of the context's |relevance|."""
    context = rel[: task["context"]].float()
    top = int(context.argmax())
    total = float(context.abs().sum()) or 1.0
    inside = any(a <= top < b for a, b in task["source"])
    rest = context.clone()
    rest[0] = -math.inf
    second = int(rest.argmax())
    inside_rest = any(a <= second < b for a, b in task["source"])
    mass = sum(float(context[a:b].sum()) for a, b in task["source"]) / total
    return inside, mass, inside_rest, float(context[0]) / total


def run(examples: int, methods: list[str]) -> dict[str, Any]:
    from lxt_plus.demo import load_smollm2

    model, tokenizer = load_smollm2()
    rows = []
    for name, make in TASKS.items():
        rng = random.Random(0)
        for i in range(examples):
            task = make(tokenizer, rng)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([task["ids"]]), use_cache=False).logits[0, -1]
            right = (
                int(logits.argmax()) == task["target"]
                if task["contrast"] is None
                else bool(logits[task["target"]] > logits[task["contrast"]])
            )
            for method in methods:
                hit, mass, hit_rest, first = score(attribute(model, method, task), task)
                rows.append(
                    {
                        "task": name,
                        "example": i,
                        "method": method,
                        "hit": hit,
                        "mass": mass,
                        "hit_without_first": hit_rest,
                        "first_share": first,
                        "right": right,
                    }
                )
    return {"rows": rows, "examples": examples}


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    version = code_version()
    lines = [
        "# Ground-truth attribution (SmolLM2-135M-Instruct)",
        "",
        f"Written by `python benchmarks/ground_truth.py` on {datetime.date.today().isoformat()} (lxt_plus "
        f"{version}, torch {torch.__version__}, CPU, float32). {result['examples']} prompts per task; the "
        "source tokens are known by construction (see the script). **top-1**: the most relevant context "
        "token lies in the source span; **mass**: the source span's relevance over the context's total "
        "|relevance|; in brackets, top-1 on the prompts the model answers right. Integrated Gradients: 16 "
        "steps from the zero embedding.",
        "",
        "| task | model right | " + " | ".join(f"{m} top-1 / mass" for m in methods) + " |",
        "|---|---:|" + "---|" * len(methods),
    ]
    for name in TASKS:
        here = [r for r in rows if r["task"] == name]
        n = len({r["example"] for r in here})
        right = sum(r["right"] for r in here if r["method"] == methods[0])
        cells = []
        for m in methods:
            got = [r for r in here if r["method"] == m]
            hits = sum(r["hit"] for r in got)
            mass = sum(r["mass"] for r in got) / len(got)
            on_right = [r for r in got if r["right"]]
            cells.append(
                f"{hits}/{len(got)} / {mass:+.2f} ({sum(r['hit'] for r in on_right)}/{len(on_right)})"
            )
        lines.append(f"| {name} | {right}/{n} | " + " | ".join(cells) + " |")
    total = {m: sum(r["hit"] for r in rows if r["method"] == m) for m in methods}
    lines += [
        "",
        "Top-1 over all tasks: "
        + ", ".join(f"{m} {total[m]}/{len(rows) // len(methods)}" for m in methods)
        + ".",
    ]
    if all("hit_without_first" in r for r in rows):
        lines += [
            "",
            "**The first token.** Rules that hold attention weights constant (AH-LRP, CP-LRP) send much "
            "relevance through the value of the first token, where attention heads park their weight (the "
            "attention sink). Top-1 with the first token set aside, and the first token's mean share of "
            "the context's |relevance|:",
            "",
            "| task | " + " | ".join(methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for name in TASKS:
            here = [r for r in rows if r["task"] == name]
            cells = []
            for m in methods:
                got = [r for r in here if r["method"] == m]
                hits = sum(r["hit_without_first"] for r in got)
                share = sum(r["first_share"] for r in got) / len(got)
                cells.append(f"{hits}/{len(got)} ({share:+.2f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated methods to run; their rows replace those of an earlier run's .json",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ground_truth.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = run(args.examples, methods)
    saved = args.out.with_suffix(".json")
    if saved.is_file() and set(methods) != set(METHODS):
        earlier = json.loads(saved.read_text())
        if earlier.get("examples") == args.examples:
            keep = [r for r in earlier["rows"] if r["method"] not in methods]
            result["rows"] = keep + result["rows"]
    saved.write_text(json.dumps(result))
    text = table(result)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
