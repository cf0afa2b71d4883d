"""A model larger than the memory it may use, explained with accelerate's disk offload.

A randomly initialised Llama of the 3B class (Llama-3.2-3B's shape: 28 layers, d_model 3072, 8192
MLP, 24 heads, 8 key/value heads, 128k vocabulary) in bfloat16, about 6.4 GB of weights, is
written to disk shard by shard (it is never whole in memory), then loaded with
``device_map="auto"`` and ``max_memory`` far below its size, so that accelerate keeps most layers
on disk and loads each one only while it runs. The benchmark times a no-grad forward and
``explain`` on the same prompt in the same process, and reports the peak resident memory of each
above the memory before the call (the process's high-water mark, reset before each call).

Usage::

    python benchmarks/offload.py                      # writes benchmarks/results/offload.md
    python benchmarks/offload.py --tokens 64 --cpu-gib 1.5
    python benchmarks/offload.py --config tiny        # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "offload.md"
CONFIGS: dict[str, dict[str, Any]] = {
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    ),
}


def _kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def write_random_checkpoint(folder: Path, name: str, seed: int = 0) -> int:
    """A random bfloat16 Llama checkpoint in ``folder``, one safetensors shard per layer (the
    model is built on the meta device and each shard filled in turn); returns its size in bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**CONFIGS[name], torch_dtype="bfloat16")
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    groups: dict[str, list[tuple[str, Any]]] = {}
    seen: set[int] = set()  # tied weights (embeddings and LM head) are written once
    for key, p in model.state_dict(keep_vars=True).items():
        if id(p) in seen:
            continue
        seen.add(id(p))
        match = re.match(r"model\.layers\.(\d+)\.", key)
        groups.setdefault(f"layer{int(match.group(1)):03d}" if match else "rest", []).append((key, p))
    index: dict[str, str] = {}
    total = 0
    for shard, items in groups.items():
        tensors = {}
        for key, p in items:
            if key.endswith("norm.weight"):
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[key] = t
            total += t.numel() * t.element_size()
        file = f"{shard}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, file))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config.save_pretrained(folder)
    return total


def measure(folder: Path, tokens: int, cpu_gib: float, offload: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from lxt_plus import explain

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.bfloat16,
        device_map="auto",
        max_memory={"cpu": f"{cpu_gib}GiB"},
        offload_folder=str(offload),
    ).eval()
    on_disk = sum(1 for v in model.hf_device_map.values() if v == "disk")
    ids = torch.randint(100, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    explain(model, ids[:, :8])  # warm-up: the rule plan is checked and cached

    def timed(fn: Any) -> tuple[float, float]:
        before = _kb("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start, (_kb("VmHWM") - before) / 1024

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    f_s, f_mb = timed(forward)
    e_s, e_mb = timed(lambda: explain(model, ids))
    weights = sum(p.numel() * 2 for p in model.parameters())
    return {
        "tokens": tokens,
        "weights_gb": weights / 2**30,
        "cpu_gib": cpu_gib,
        "modules_on_disk": on_disk,
        "modules": len(model.hf_device_map),
        "resident_mb_loaded": _kb("VmRSS") / 1024,
        "forward_s": f_s,
        "forward_extra_mb": f_mb,
        "explain_s": e_s,
        "explain_extra_mb": e_mb,
        "threads": torch.get_num_threads(),
    }


def table(r: dict[str, Any], name: str) -> str:
    return "\n".join(
        [
            f"# explain with accelerate disk offload: random Llama ({name} config, bfloat16)",
            "",
            f"{r['weights_gb']:.1f} GB of weights; `max_memory` {r['cpu_gib']:g} GiB of CPU memory, so "
            f"{r['modules_on_disk']} of {r['modules']} device-map entries live on disk. {r['tokens']} tokens, "
            f"torch threads {r['threads']}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}. "
            "Extra = resident high-water mark during the call minus the resident size before it "
            f"(loaded model: {r['resident_mb_loaded']:.0f} MB resident).",
            "",
            "| call | wall (s) | extra memory (MB) | ÷ forward |",
            "|---|---:|---:|---:|",
            f"| no-grad forward | {r['forward_s']:.1f} | {r['forward_extra_mb']:.0f} | 1.00 |",
            f"| explain (attnlrp) | {r['explain_s']:.1f} | {r['explain_extra_mb']:.0f} | "
            f"{r['explain_s'] / r['forward_s']:.2f} |",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="3b")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cpu-gib", type=float, default=2.0, help="max_memory for the CPU")
    parser.add_argument("--folder", type=Path, help="where the checkpoint is (written there when missing)")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "model"
        if not (folder / "config.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            size = write_random_checkpoint(folder, args.config)
            print(f"wrote {size / 2**30:.2f} GB to {folder}", flush=True)
        if args.write_only:
            return
        result = measure(folder, args.tokens, args.cpu_gib, Path(tmp) / "offload")
    print(json.dumps(result), flush=True)
    report = table(result, args.config)
    if args.config == "3b":
        args.out.write_text(report)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main()
