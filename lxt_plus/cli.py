"""``lxt-plus``: the command line, a thin layer over the Python API.

Errors print one line on stderr (``lxt-plus: error: ...``) and exit with 2 for usage and
configuration errors (bad preset, malformed YAML, unknown target) or 1 for anything else;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigError, InputError, LxtPlusError, PresetError, TargetError

__all__ = ["main", "build_parser"]

PROG = "lxt-plus"
USAGE_ERRORS = (ConfigError, PresetError, TargetError)
FORMATS = ("terminal", "html", "json", "png")


class _UsageError(Exception):
    """A command line that cannot work (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``lxt-plus`` argument parser with its sub-commands."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    model = _Parser(add_help=False)
    model.add_argument("--model", metavar="PATH|NAME", default=None,
                       help="'smollm2' (default), 'sentiment' (the fine-tuned MiniLM classifier) or a "
                            "folder saved with save_pretrained")
    rules = _Parser(add_help=False)
    rules.add_argument("--rules", metavar="NAME|FILE.yaml", default="attnlrp",
                       help="preset name (attnlrp, ah-lrp/cp-lrp, gradient, conservative-check) or a "
                            "YAML preset file (default: attnlrp)")
    output = _Parser(add_help=False)
    output.add_argument("--format", choices=FORMATS, default=None,
                        help="terminal (default), html, json or png; default from --out's suffix")
    output.add_argument("--out", metavar="FILE", default=None,
                        help="write here instead of stdout (png needs it)")

    parser = _Parser(prog=PROG, description="Layer-wise Relevance Propagation (AttnLRP) for HuggingFace "
                                            "transformers: which input tokens made the model say that?")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("explain", parents=[common, model, rules, output],
                       help="explain one prediction (next token or class) of a text")
    p.add_argument("text", metavar="TEXT", help="the text whose prediction is explained")
    p.add_argument("--target", metavar="T", default=None,
                   help="token (' Paris'), token id, class label or index to explain (default: the prediction)")
    p.add_argument("--contrast", metavar="F", default=None,
                   help="explain logit(target) - logit(F) instead")
    p.add_argument("--chat", action="store_true", help="wrap TEXT in the tokenizer's chat template")
    p.add_argument("--words", action="store_true", help="merge sub-word tokens into words")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("generate", parents=[common, model, rules, output],
                       help="generate greedily and explain every generated token")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the tokenizer's chat template")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("audit", parents=[common, model],
                       help="print the rule plan and check conservation (exit 1 on a leak)")
    p.add_argument("--rules", metavar="NAME|FILE.yaml", default="ah-lrp",
                   help="plan to audit, biases zeroed (default: ah-lrp)")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser("explain-file", parents=[common, rules],
                       help="explain every row of a CSV file into a JSON-lines file (resumable)")
    p.add_argument("source", metavar="FILE", help="a CSV file with a header row")
    p.add_argument("--model", metavar="PATH|NAME", default="sentiment",
                   help="'sentiment' (default), 'smollm2' or a folder saved with save_pretrained")
    p.add_argument("--column", default="text", help="column holding the text (default: text)")
    p.add_argument("--out", metavar="FILE.jsonl", default=None,
                   help="default: FILE with the suffix .relevance.jsonl")
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--target", metavar="T", default=None, help="target for every row (default: the prediction)")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming")
    p.set_defaults(func=_cmd_explain_file)

    p = sub.add_parser("train-sentiment", parents=[common],
                       help="fine-tune MiniLM on Rotten Tomatoes reviews (cached; a few minutes on a CPU)")
    p.add_argument("--out", metavar="DIR", default=None, help="where to save the model (default: the cache)")
    p.add_argument("--force", action="store_true", help="train again even when a saved model exists")
    p.set_defaults(func=_cmd_train_sentiment)
    return parser


# --------------------------------------------------------------------------- helpers
def _spec(value: str | None) -> int | str | None:
    """A target from the command line: an integer literal is an id or class index, anything else a string."""
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return int(value)
    return value


def _format(args: argparse.Namespace) -> str:
    if args.format is not None:
        return str(args.format)
    if args.out is None:
        return "terminal"
    suffix = Path(args.out).suffix.lower().lstrip(".")
    return {"htm": "html", "pdf": "png", "svg": "png"}.get(suffix, suffix if suffix in FORMATS else "terminal")


def _check_rules(rules: str) -> None:
    """Validate the preset before loading any model, so that config errors come fast."""
    from .plan import get_preset

    get_preset(rules)


def _load(name: str | None) -> tuple[Any, Any]:
    from . import models

    if name is None:
        return models.load_smollm2()
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise InputError(f"model folder {name!r} does not exist")
    task = "causal-lm"
    config = Path(name) / "config.json"
    if config.is_file():
        archs = json.loads(config.read_text()).get("architectures") or []
        if any("Classification" in a for a in archs):
            task = "sequence-classification"
    return models.load_model(name, task=task)


def _emit(result: Any, fmt: str, out: str | None, **render: Any) -> None:
    """Print or save an explanation (or generation explanation) in ``fmt``."""
    if fmt == "terminal":
        text = result.to_terminal(**render)
        if out is None:
            sys.stdout.write(text)
        else:
            Path(out).write_text(text, encoding="utf-8")
        return
    if out is None:
        if fmt == "png":
            raise _UsageError("--format png needs --out FILE.png")
        if fmt == "html":
            sys.stdout.write(result.to_html(**render) + "\n")
        else:
            sys.stdout.write(json.dumps(result.to_dict()) + "\n")
        return
    suffix = Path(out).suffix.lower()
    wanted = {"html": (".html", ".htm"), "json": (".json",), "png": (".png", ".pdf", ".svg")}[fmt]
    if suffix not in wanted:
        raise _UsageError(f"--format {fmt} writes {' or '.join(wanted)} files, got --out {out!r}")
    result.save(out, **({} if fmt == "json" else render))
    print(f"wrote {out}", file=sys.stderr)


# --------------------------------------------------------------------------- commands
def _cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain

    _check_rules(args.rules)
    model, tokenizer = _load(args.model)
    exp = explain(model, args.text, _spec(args.target), tokenizer=tokenizer, rules=args.rules,
                  contrast=_spec(args.contrast), chat=args.chat)
    fmt = _format(args)
    _emit(exp, fmt, args.out, **({"words": True} if args.words and fmt != "json" else {}))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation import explain_generation

    _check_rules(args.rules)
    model, tokenizer = _load(args.model)
    gen = explain_generation(model, tokenizer, args.prompt, args.max_new_tokens, rules=args.rules,
                             chat=args.chat, progress=True)
    _emit(gen, _format(args), args.out)
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit

    _check_rules(args.rules)
    model, _ = _load(args.model)
    report = audit(model, rules=args.rules)
    print(report)
    return 0 if report.ok else 1


def _cmd_explain_file(args: argparse.Namespace) -> int:
    from .dataset import explain_dataset

    _check_rules(args.rules)
    if args.batch_size < 1:
        raise _UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    source = Path(args.source)
    if not source.is_file():
        raise InputError(f"input file {str(source)!r} does not exist")
    out = Path(args.out) if args.out else source.with_suffix(".relevance.jsonl")
    model, tokenizer = _load(args.model)
    rows = explain_dataset(model, str(source), str(out), tokenizer=tokenizer, rules=args.rules,
                           column=args.column, batch_size=args.batch_size, target=_spec(args.target),
                           resume=not args.restart, progress=True)
    print(f"wrote {rows} rows to {out}")
    return 0


def _cmd_train_sentiment(args: argparse.Namespace) -> int:
    from .models import train_sentiment

    result = train_sentiment(args.out, force=args.force, progress=True)
    state = "trained" if result.trained else "loaded (use --force to retrain)"
    print(f"sentiment classifier {state}: {result.path}")
    print(f"test accuracy: {result.test_accuracy:.4f}")
    return 0


# --------------------------------------------------------------------------- entry point
@contextlib.contextmanager
def _quiet(debug: bool) -> Iterator[None]:
    """transformers' warnings and loading bars off unless debugging (they would bury the one-line errors)."""
    if debug:
        yield
        return
    import warnings

    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hub_level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hub_logging.set_verbosity(hub_level)
        if bars:
            hf_logging.enable_progress_bar()


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    line = " ".join(message.split()) or "unknown error"
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lxt-plus``; returns the exit code (0 ok, 1 error, 2 usage or configuration error)."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        with _quiet(debug):
            return int(args.func(args))
    except _UsageError as exc:
        return _fail(str(exc), 2, debug)
    except USAGE_ERRORS as exc:
        return _fail(str(exc), 2, debug)
    except LxtPlusError as exc:
        return _fail(str(exc), 1, debug)
    except ModuleNotFoundError as exc:
        package = (exc.name or "?").split(".")[0]
        if package == "lxt_plus":
            return _fail(f"{exc} (this lxt_plus install lacks a module)", 1, debug)
        return _fail(f"the optional package {package!r} is not installed; run `pip install {package}`", 1, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, debug)
    except Exception as exc:  # noqa: BLE001 - anything else: one line too, the traceback with --debug
        hint = "" if debug else " (rerun with --debug for the traceback)"
        return _fail(f"{type(exc).__name__}: {exc}{hint}", 1, debug)


if __name__ == "__main__":
    sys.exit(main())
