"""``lxt-plus``: the command line, a thin layer over the Python API.

Arguments are parsed before anything heavy is imported: ``--help`` and ``--version`` never import
torch or transformers, and each command imports only what it needs. Errors print one line on
stderr (``lxt-plus: error: ...``) and exit with one of :data:`EXIT_CODES`; ``--debug`` adds the
traceback. Target warnings print one line each (``lxt-plus: warning: ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lxt_plus import __version__
from lxt_plus.engine.names import PRESET_NAMES
from lxt_plus.errors import ConfigError, InputError, LxtPlusError, PresetError, TargetError, TargetWarning
from lxt_plus.render import COLOR_MODES, EXPLANATION_FORMATS, GENERATION_FORMATS, IMAGE_FORMATS, use_color

__all__ = ["EXIT_CODES", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

PROG = "lxt-plus"

# Exit codes, defined once: the --help epilog and the README list these.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_CODES = (
    (EXIT_OK, "success"),
    (
        EXIT_FAILURE,
        "the run failed: a model lxt_plus cannot explain, NaN/inf relevance, out of memory, "
        "a missing optional package, a leak found by `audit`, any unexpected error",
    ),
    (
        EXIT_USAGE,
        "usage, configuration or input error, to fix in the command: an unknown option or "
        "value, a bad preset or YAML file, an unknown target (or an ambiguous one with "
        "--strict-target), an empty text, a missing file, folder or CSV column",
    ),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
# errors that mean "change the command line" (exit 2); every other error is a failed run (exit 1)
USAGE_ERRORS: tuple[type[Exception], ...] = (ConfigError, PresetError, TargetError, InputError, TargetWarning)

# --format choices, from the list the renderers and Explanation.save use
EXPLAIN_FORMATS = ("terminal", *EXPLANATION_FORMATS)
GENERATE_FORMATS = ("terminal", *GENERATION_FORMATS)

_TARGETS_HELP = """\
targets:
  --target takes a token string (' Paris': mind the leading space that a word has after another
  word), a token id, or for classifiers a label name or class index. A string that splits into
  several tokens explains the SUM of their logits at the explained position. lxt-plus then prints a
  warning naming the tokens; it also warns when a leading-space variant is one token ('Paris' ->
  ' Paris') and when a causal LM is given a class label ('POSITIVE'). --strict-target turns these
  warnings into errors (exit 2)."""

_COLOR_HELP = """\
colour:
  --color auto (the default) colours the terminal view only when stdout is a terminal; NO_COLOR=1
  (any non-empty value) turns colour off, FORCE_COLOR=1 on (NO_COLOR wins); --color always|never
  overrides both. Without colour there are no escape codes, and each token is followed by its
  normalised relevance, e.g. ' France[+1.00]'."""


def _exit_codes_help() -> str:
    import textwrap

    lines = ["exit codes:"]
    for code, meaning in EXIT_CODES:
        lines += textwrap.wrap(meaning, 96, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    return "\n".join(lines)


class _UsageError(Exception):
    """A command line that cannot work (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _output_options(formats: Sequence[str]) -> _Parser:
    output = _Parser(add_help=False)
    output.add_argument(
        "--format",
        choices=formats,
        default=None,
        help=f"{', '.join(formats)} (default: from --out's suffix, else terminal); "
        f"{'/'.join(IMAGE_FORMATS)} need --out",
    )
    output.add_argument("--out", metavar="FILE", default=None, help="write here instead of stdout")
    output.add_argument(
        "--color",
        choices=COLOR_MODES,
        default="auto",
        help="colour the terminal view: auto (default: only on a terminal, honouring "
        "NO_COLOR and FORCE_COLOR), always or never",
    )
    return output


def build_parser() -> argparse.ArgumentParser:
    """The ``lxt-plus`` argument parser with its sub-commands."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors, and every warning",
    )
    model = _Parser(add_help=False)
    model.add_argument(
        "--model",
        metavar="PATH|NAME",
        default=None,
        help="'smollm2' (default), 'sentiment' (the fine-tuned MiniLM classifier) or a "
        "folder saved with save_pretrained",
    )
    rules = _Parser(add_help=False)
    rules.add_argument(
        "--rules",
        metavar="NAME|FILE.yaml",
        default="attnlrp",
        help=f"preset name ({_PRESET_NAMES}) or a YAML preset file (default: attnlrp)",
    )
    _add_override(rules)
    strict = _Parser(add_help=False)
    strict.add_argument(
        "--strict-target",
        action="store_true",
        help="make target warnings (several tokens, a missing leading space, a class "
        "label for a causal LM) errors",
    )
    exit_codes = _exit_codes_help()

    parser = _Parser(
        prog=PROG,
        description="Layer-wise Relevance Propagation (AttnLRP) for HuggingFace transformers:\n"
        "which input tokens made the model say that?",
        epilog=f"{_TARGETS_HELP}\n\n{_COLOR_HELP}\n\n{exit_codes}",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback on errors, and every warning"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser(
        "explain",
        parents=[common, model, rules, _output_options(EXPLAIN_FORMATS), strict],
        help="explain one prediction (next token or class) of a text",
        epilog=f"{_TARGETS_HELP}\n\n{_COLOR_HELP}\n\n{exit_codes}",
    )
    p.add_argument(
        "text", metavar="TEXT", nargs="?", default=None, help="the text whose prediction is explained"
    )
    p.add_argument(
        "--image",
        metavar="FILE",
        default=None,
        help="explain an image classifier's prediction for this image (TEXT then not needed), or, with "
        "a vision-language model, TEXT about this image (needs a model folder with its processor; the "
        "image placeholder goes before TEXT unless TEXT holds it, or into the chat template with --chat)",
    )
    p.add_argument(
        "--target",
        metavar="T",
        default=None,
        help="token (' Paris'), token id, class label or index to explain (default: the "
        "prediction); several tokens: the sum of their logits (see below)",
    )
    p.add_argument("--contrast", metavar="F", default=None, help="explain logit(target) - logit(F) instead")
    p.add_argument("--chat", action="store_true", help="wrap TEXT in the tokenizer's chat template")
    p.add_argument("--words", action="store_true", help="merge sub-word tokens into words")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "generate",
        parents=[common, model, rules, _output_options(GENERATE_FORMATS)],
        help="generate greedily and explain every generated token",
        epilog=f"{_COLOR_HELP}\n\n{exit_codes}",
    )
    p.add_argument("prompt", metavar="PROMPT", help="the prompt to continue")
    p.add_argument(
        "--image",
        metavar="FILE",
        default=None,
        help="a vision-language model's image for PROMPT (needs a model folder with its processor); "
        "relevance on the prompt's tokens and the image's pixels",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the tokenizer's chat template")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "audit",
        parents=[common, model],
        help="print the rule plan and check conservation (exit 1 on a leak)",
        epilog=exit_codes,
    )
    p.add_argument(
        "--rules",
        metavar="NAME|FILE.yaml",
        default="ah-lrp",
        help="plan to audit, biases zeroed (default: ah-lrp)",
    )
    _add_override(p)
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser(
        "explain-file",
        parents=[common, rules, strict],
        help="explain every row of a CSV file into a JSON-lines file (resumable)",
        epilog=f"{_TARGETS_HELP}\n\n{exit_codes}",
    )
    p.add_argument("source", metavar="FILE", help="a CSV file with a header row")
    p.add_argument(
        "--model",
        metavar="PATH|NAME",
        default="sentiment",
        help="'sentiment' (default), 'smollm2' or a folder saved with save_pretrained",
    )
    p.add_argument("--column", default="text", help="column holding the text (default: text)")
    p.add_argument(
        "--out", metavar="FILE.jsonl", default=None, help="default: FILE with the suffix .relevance.jsonl"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument(
        "--target", metavar="T", default=None, help="target for every row (default: the prediction)"
    )
    p.add_argument("--restart", action="store_true", help="start over instead of resuming")
    p.set_defaults(func=_cmd_explain_file)

    p = sub.add_parser(
        "train-sentiment",
        parents=[common],
        help="fine-tune MiniLM on Rotten Tomatoes reviews (once, then cached; 1-2 minutes on 2 CPU cores)",
        epilog=exit_codes,
    )
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


def _format(args: argparse.Namespace, formats: Sequence[str]) -> str:
    """``--format``, else the format ``--out``'s suffix names, else terminal (text)."""
    if args.format is not None:
        return str(args.format)
    if args.out is None:
        return "terminal"
    suffix = Path(args.out).suffix.lower().lstrip(".")
    if suffix in formats:
        return suffix
    if suffix in EXPLANATION_FORMATS:  # a format another command writes
        raise _UsageError(
            f"{args.command} cannot write .{suffix} files; use one of "
            f"{', '.join('.' + f for f in formats if f != 'terminal')}, or another suffix "
            "for the terminal view as text"
        )
    return "terminal"


def _check_token_targets(model: Any, tokenizer: Any, specs: dict[str, Any], strict: bool) -> None:
    """Resolve string targets of a causal LM once, before any work: a warning prints once, and
    ``--strict-target`` fails fast (before a progress bar starts)."""
    from lxt_plus.api.explain import model_kind, resolve_token

    if tokenizer is None or model_kind(model) != "causal-lm":
        return
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    for what, spec in specs.items():
        if isinstance(spec, str):
            resolve_token(tokenizer, spec, vocab, what, strict_target=strict)


def _nonempty(text: str, name: str) -> None:
    if not text.strip():
        raise _UsageError(f"{name} is empty or whitespace only: there is nothing to explain")


def _check_rules(args: argparse.Namespace) -> Any:
    """The preset with its ``--override`` entries, validated before any model loads (config errors
    come fast)."""
    import yaml

    from lxt_plus.engine.plan import get_preset
    from lxt_plus.errors import ConfigError

    preset = get_preset(args.rules)
    for text in args.override or []:  # as preset.override(...) chained: the last one given is tried first
        selector, eq, spec = text.partition("=")
        name, _, raw = spec.partition(":")
        if not eq or not selector or not name:
            raise ConfigError(f"--override {text!r}: expected SELECTOR=RULE or SELECTOR=RULE:key=value,...")
        params: dict[str, Any] = {}
        for item in filter(None, raw.split(";" if ";" in raw else ",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"--override {text!r}: parameter {item!r} is not key=value")
            params[key.strip()] = yaml.safe_load(value)
        preset = preset.override(selector, {name: params} if params else name)
    return preset


_PRESET_NAMES = ", ".join(PRESET_NAMES)  # for --help, without importing torch


def _add_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--override",
        action="append",
        metavar="SELECTOR=RULE[:k=v;...]",
        help="put a rule ahead of the preset's, e.g. linear=zplus, conv=gamma:gamma=0.5, "
        'name:model.layers.0.*=epsilon:eps=1e-3, "conv=zbox:low=[-1,-2];high=1" (repeatable: the '
        "last one given is tried first, as chained preset.override(...) calls; see lxt_plus.list_rules() "
        "for the rule names)",
    )


def _load(name: str | None) -> tuple[Any, Any]:
    from lxt_plus import demo as models

    if name is None:
        return models.load_smollm2()
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise InputError(f"model folder {name!r} does not exist")
    task = "causal-lm"
    config = Path(name) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        archs = data.get("architectures") or []
        if any("ImageClassification" in a for a in archs):
            task = "image-classification"
        elif data.get("vision_config") is not None and any("ConditionalGeneration" in a for a in archs):
            task = "image-text-to-text"
        elif any("Classification" in a for a in archs):
            task = "sequence-classification"
    return models.load_model(name, task=task)


def _image_prompt(processor: Any, text: str, chat: bool) -> str:
    """A vision-language prompt with its image placeholder: the processor's chat template with an
    image entry (``--chat``), else TEXT after the processor's image token unless it holds one."""
    if chat:
        if not getattr(processor, "chat_template", None):
            raise InputError("--chat: this model's processor has no chat template; leave out --chat")
        message = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        return str(processor.apply_chat_template([message], add_generation_prompt=True))
    token = getattr(processor, "image_token", None)
    return f"{token}\n{text}" if isinstance(token, str) and token and token not in text else text


def _image_inputs(
    model: Any, processor: Any, text: str | None, image: str, chat: bool = False
) -> dict[str, Any]:
    """The model inputs for ``--image FILE`` (and TEXT for a vision-language model)."""
    path = Path(image).expanduser()
    if not path.is_file():
        raise InputError(f"image file {image!r} does not exist")
    if processor is None or not callable(processor):
        raise InputError(
            "--image needs a model folder with an image processor (preprocessor_config.json) or a processor"
        )
    from PIL import Image

    try:
        picture = Image.open(path).convert("RGB")
    except OSError as exc:
        raise InputError(f"{image!r} is not an image file this machine can read ({exc})") from None
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return dict(processor(images=picture, return_tensors="pt"))
    if not text:
        raise _UsageError("a vision-language model needs TEXT (the prompt) beside --image")
    prompt = _image_prompt(processor, text, chat)
    try:
        return dict(processor(text=prompt, images=picture, return_tensors="pt"))
    except (ValueError, TypeError) as exc:  # the processor's own check of text and images
        raise InputError(f"the model's processor could not prepare TEXT with the image: {exc}") from None


def _emit(result: Any, fmt: str, out: str | None, color: str, **render: Any) -> None:
    """Print or save an explanation (or generation explanation) in ``fmt``."""
    if fmt == "terminal":
        tty = sys.stdout.isatty() if out is None else False
        text = result.to_terminal(color=use_color(color, tty), **render)
        if out is None:
            sys.stdout.write(text)
        else:
            Path(out).write_text(text, encoding="utf-8")
        return
    if out is None:
        if fmt in IMAGE_FORMATS:
            raise _UsageError(f"--format {fmt} needs --out FILE.{fmt}")
        if fmt == "html":
            text = result.to_html(**render)
        elif fmt == "tex":
            text = result.to_latex(**render)
        else:
            text = json.dumps(result.to_dict())
        sys.stdout.write(text + "\n")
        return
    suffix = Path(out).suffix.lower()
    if suffix != f".{fmt}":
        raise _UsageError(f"--format {fmt} writes .{fmt} files, got --out {out!r}")
    result.save(out, **({} if fmt == "json" else render))
    print(f"wrote {out}", file=sys.stderr)


# --------------------------------------------------------------------------- commands
def _cmd_explain(args: argparse.Namespace) -> int:
    if args.image is None:
        if args.text is None:
            raise _UsageError("give TEXT to explain (or --image FILE for an image model)")
        _nonempty(args.text, "TEXT")
    fmt = _format(args, EXPLAIN_FORMATS)
    rules = _check_rules(args)
    from lxt_plus.api.explain import explain

    model, tokenizer = _load(args.model)
    target, contrast = _spec(args.target), _spec(args.contrast)
    if args.image is not None:
        inputs = _image_inputs(model, tokenizer, args.text, args.image, args.chat)
        exp = explain(
            model,
            inputs,
            target,
            tokenizer=getattr(tokenizer, "tokenizer", None),
            rules=rules,
            contrast=contrast,
            strict_target=args.strict_target,
        )
        _emit(exp, fmt, args.out, args.color)
        return EXIT_OK
    _check_token_targets(model, tokenizer, {"target": target, "contrast": contrast}, args.strict_target)
    exp = explain(
        model,
        args.text,
        target,
        tokenizer=tokenizer,
        rules=rules,
        contrast=contrast,
        chat=args.chat,
        strict_target=args.strict_target,
    )
    _emit(exp, fmt, args.out, args.color, **({"words": True} if args.words and fmt != "json" else {}))
    return EXIT_OK


def _cmd_generate(args: argparse.Namespace) -> int:
    _nonempty(args.prompt, "PROMPT")
    if args.max_new_tokens < 1:
        raise _UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    fmt = _format(args, GENERATE_FORMATS)
    rules = _check_rules(args)
    from lxt_plus.api.generation import explain_generation

    model, tokenizer = _load(args.model)
    if args.image is not None:  # a vision-language model: the processor's ids and images
        prompt = _image_inputs(model, tokenizer, args.prompt, args.image, args.chat)
        gen = explain_generation(
            model,
            getattr(tokenizer, "tokenizer", None),
            prompt,
            args.max_new_tokens,
            rules=rules,
            progress=True,
        )
    else:
        gen = explain_generation(
            model, tokenizer, args.prompt, args.max_new_tokens, rules=rules, chat=args.chat, progress=True
        )
    _emit(gen, fmt, args.out, args.color)
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from lxt_plus.evaluation.audit import audit

    rules = _check_rules(args)
    model, _ = _load(args.model)
    report = audit(model, rules=rules)
    print(report)
    return EXIT_OK if report.ok else EXIT_FAILURE


def _cmd_explain_file(args: argparse.Namespace) -> int:
    rules = _check_rules(args)
    if args.batch_size < 1:
        raise _UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    source = Path(args.source)
    if not source.is_file():
        raise InputError(f"input file {str(source)!r} does not exist")
    out = Path(args.out) if args.out else source.with_suffix(".relevance.jsonl")
    from lxt_plus.api.dataset import explain_dataset

    model, tokenizer = _load(args.model)
    _check_token_targets(model, tokenizer, {"target": _spec(args.target)}, args.strict_target)
    rows = explain_dataset(
        model,
        str(source),
        str(out),
        tokenizer=tokenizer,
        rules=rules,
        column=args.column,
        batch_size=args.batch_size,
        target=_spec(args.target),
        resume=not args.restart,
        progress=True,
    )
    print(f"wrote {rows} rows to {out}")
    return EXIT_OK


def _cmd_train_sentiment(args: argparse.Namespace) -> int:
    from lxt_plus.demo import train_sentiment

    result = train_sentiment(args.out, force=args.force, progress=True)
    state = "trained" if result.trained else "loaded (use --force to retrain)"
    print(f"sentiment classifier {state}: {result.path}")
    print(f"test accuracy: {result.test_accuracy:.4f}")
    return EXIT_OK


# --------------------------------------------------------------------------- entry point
@contextlib.contextmanager
def _quiet(debug: bool, strict_target: bool) -> Iterator[None]:
    """transformers' warnings and loading bars off unless debugging (they would bury the one-line
    errors); target warnings on, one line each (errors with ``--strict-target``)."""
    seen: set[str] = set()
    with warnings.catch_warnings():
        if not debug:
            warnings.simplefilter("ignore")
        warnings.simplefilter("error" if strict_target else "always", TargetWarning)
        shown = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, TargetWarning):
                shown(message, category, *args, **kwargs)
                return
            line = " ".join(str(message).split())
            if line not in seen:  # a batch or a file repeats the same target
                seen.add(line)
                print(f"{PROG}: warning: {line}", file=sys.stderr)

        warnings.showwarning = show  # catch_warnings puts the original back
        if debug:
            yield
            return
        with _quiet_loggers(IMPORT_NOTICES):  # before transformers is imported: it may load torchao
            from lxt_plus.engine.hf import quiet_transformers

            with quiet_transformers(progress_bars=False):
                yield


# Loggers of libraries transformers imports itself, whose import-time notices are not for our
# users: torchao's CUDA extensions failing to load on a CPU machine, torch's note on torchao's
# pytree registrations.
IMPORT_NOTICES = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """The standard-library loggers ``names`` at error level inside the block; restored on exit."""
    import logging

    loggers = [logging.getLogger(n) for n in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.setLevel(level)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    line = " ".join(message.split()) or "unknown error"
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lxt-plus``; returns the exit code (:data:`EXIT_CODES`)."""
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        with _quiet(debug, bool(getattr(args, "strict_target", False))):
            return int(args.func(args))
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE, debug)
    except TargetWarning as exc:  # raised by --strict-target
        return _fail(f"{exc} (--strict-target: pass one unambiguous token, or a token id)", EXIT_USAGE, debug)
    except USAGE_ERRORS as exc:
        return _fail(str(exc), EXIT_USAGE, debug)
    except LxtPlusError as exc:
        return _fail(str(exc), EXIT_FAILURE, debug)
    except ModuleNotFoundError as exc:
        package = (exc.name or "?").split(".")[0]
        if package == "lxt_plus":
            return _fail(f"{exc} (this lxt_plus install lacks a module)", EXIT_FAILURE, debug)
        return _fail(
            f"the optional package {package!r} is not installed; run `pip install {package}`",
            EXIT_FAILURE,
            debug,
        )
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED, debug)
    except Exception as exc:  # noqa: BLE001 - anything else: one line too, the traceback with --debug
        hint = "" if debug else " (rerun with --debug for the traceback)"
        return _fail(f"{type(exc).__name__}: {exc}{hint}", EXIT_FAILURE, debug)


if __name__ == "__main__":
    sys.exit(main())
