"""Explain a whole corpus: batched, resumable, data-parallel under ``accelerate launch``.

Each explained row becomes one JSON line::

    {"index": 17, "text": "...", "tokens": [...], "relevance": [...],
     "target": {"label": " good", "ids": [1049], "position": 12, "contrast": null, "contrast_ids": []},
     "target_logit": 3.21, "meta": {"label": "1"}}

A row that cannot be explained (empty text, longer than the model's positions, ...) gets
``"error": "<ErrorType>: <message>"`` instead of ``tokens``/``relevance``, so one bad row never stops a
run and is not retried on resume.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lxt_plus.api.explain import explain, explaining
from lxt_plus.engine.plan import Preset
from lxt_plus.errors import InputError, LxtPlusError

__all__ = ["explain_dataset", "read_results"]

Source = str | os.PathLike[str] | Sequence[str] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class _Row:
    index: int
    text: str
    meta: dict[str, Any]


def _load_rows(source: Source, column: str, max_rows: int | None) -> list[_Row]:
    """Rows of a CSV file (``column`` is the text, other columns become ``meta``) or of a list."""
    rows: list[_Row] = []
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"source {str(path)!r} is not a file; pass a CSV path or a list of texts")
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if column not in (reader.fieldnames or []):
                raise InputError(f"{path.name} has no column {column!r}; columns: {reader.fieldnames}")
            for i, rec in enumerate(reader):
                if max_rows is not None and i >= max_rows:
                    break
                rows.append(_Row(i, rec[column] or "", {k: v for k, v in rec.items() if k != column}))
        return rows
    for i, item in enumerate(source):
        if max_rows is not None and i >= max_rows:
            break
        if isinstance(item, str):
            rows.append(_Row(i, item, {}))
        elif isinstance(item, Mapping) and column in item:
            rows.append(_Row(i, str(item[column]), {k: v for k, v in item.items() if k != column}))
        else:
            raise InputError(
                f"source row {i} is a {type(item).__name__}; expected a text or a mapping with key {column!r}"
            )
    return rows


def _read_lines(path: Path, repair: bool) -> dict[int, str]:
    """``index -> JSON line`` of a results file. An incomplete last line (a killed writer) is dropped,
    and cut from the file when ``repair``; a broken line elsewhere is an :class:`InputError`."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")  # tail: bytes after the last newline, a cut write
    found: dict[int, str] = {}
    end = 0
    for n, raw in enumerate(complete):
        if raw.strip():
            try:
                text = raw.decode("utf-8")
                index = int(json.loads(text)["index"])
            except (ValueError, KeyError, TypeError) as exc:
                if n == len(complete) - 1 and not tail:
                    break
                raise InputError(
                    f"{path.name} line {n + 1} is not a result record ({exc}); "
                    "remove the file or pass resume=False"
                ) from None
            found.setdefault(index, text)
        end += len(raw) + 1
    if repair and end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return found


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of an :func:`explain_dataset` output file, in row order."""
    lines = _read_lines(Path(path), repair=False)
    return [json.loads(lines[i]) for i in sorted(lines)]


def _shards(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.rank*"))


def _finalize(out: Path) -> None:
    """Merge shard files into ``out``: every row once, sorted by index; shards are removed."""
    shards = _shards(out)
    lines = _read_lines(out, repair=True)
    in_order = list(lines) == sorted(lines)
    for shard in shards:
        for i, line in _read_lines(shard, repair=False).items():
            lines.setdefault(i, line)
    if not shards and in_order:
        return
    tmp = out.with_name(out.name + ".merging")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(lines[i] + "\n" for i in sorted(lines))
    os.replace(tmp, out)
    for shard in shards:
        shard.unlink()


def _records(
    model: nn.Module, rows: list[_Row], tokenizer: Any, rules: Any, target: Any, contrast: Any
) -> Iterator[dict[str, Any]]:
    """Explain ``rows`` in one padded batch; on an error, row by row so that only bad rows fail."""
    texts = [r.text for r in rows]
    targets = [target(r.text, r.meta) for r in rows] if callable(target) else target
    foils = [contrast(r.text, r.meta) for r in rows] if callable(contrast) else contrast
    try:
        exp = explain(model, texts, targets, tokenizer=tokenizer, rules=rules, contrast=foils)
    except LxtPlusError as exc:
        if len(rows) == 1:
            yield {
                "index": rows[0].index,
                "text": rows[0].text,
                "meta": rows[0].meta,
                "error": f"{type(exc).__name__}: {exc}",
            }
            return
        for row in rows:
            yield from _records(model, [row], tokenizer, rules, target, contrast)
        return
    for b, row in enumerate(rows):
        tokens, rel = exp.real_tokens(b)
        t = exp.targets[b]
        mask = exp.attention_mask
        position = t.position
        if position is not None and mask is not None:  # count real tokens only: independent of padding
            position = int(mask[b, :position].sum())
        yield {
            "index": row.index,
            "text": row.text,
            "tokens": tokens,
            "relevance": rel.tolist(),
            "target": {
                "label": t.label,
                "ids": list(t.ids),
                "position": position,
                "contrast": t.contrast_label,
                "contrast_ids": list(t.contrast_ids),
            },
            "target_logit": float(exp.target_logit[b]),
            "meta": row.meta,
        }


def explain_dataset(
    model: nn.Module,
    source: Source,
    out_path: str | os.PathLike[str],
    *,
    tokenizer: Any,
    rules: str | Preset | dict[str, Any] = "attnlrp",
    column: str = "text",
    batch_size: int = 8,
    target: Any = None,
    contrast: Any = None,
    resume: bool = True,
    progress: bool = True,
    max_rows: int | None = None,
) -> int:
    """Explain every row of a corpus and write one JSON line per row to ``out_path``.

    Rows are explained in padded batches (one forward and one backward pass per batch, longest texts
    first) and the file is flushed after each batch. Under ``accelerate launch`` the rows are split
    across processes (row ``i`` goes to process ``i % num_processes``); each process writes
    ``out_path.rank<k>`` and the main process merges the shards into ``out_path``, sorted by row index.
    On a machine without GPUs, ``accelerate launch --multi_gpu --num_processes N script.py`` (or
    ``torchrun --nproc_per_node N``) starts the processes and they communicate over gloo.

    Parameters
    ----------
    model:
        A HF causal LM or sequence classifier, on the device it should run on (in a parallel run,
        ``accelerate.PartialState().device``).
    source:
        A CSV file path (read with :mod:`csv`; ``column`` is the text, the other columns are kept as
        ``meta``), a list of texts, or a list of mappings holding ``column``.
    out_path:
        The JSON-lines output file.
    tokenizer:
        The model's tokenizer; it needs a pad token for ``batch_size > 1``.
    rules:
        Preset name, YAML path or :class:`~lxt_plus.engine.plan.Preset` (see :func:`lxt_plus.explain`).
    column:
        Name of the text column (CSV) or key (mappings).
    batch_size:
        Rows per forward/backward pass.
    target, contrast:
        One target (and foil) for every row as in :func:`lxt_plus.explain` (``None``: the prediction), or
        a callable ``(text, meta) -> target`` (for example from the label column of a classifier
        dataset). A row whose target does not exist gets an ``"error"`` record.
    resume:
        Keep the rows already in ``out_path`` (or in shards of a killed parallel run) and explain only
        the others. An incomplete last line, left by a killed run, is dropped and its row redone.
        ``False`` starts afresh.
    progress:
        Show a tqdm progress bar (main process only).
    max_rows:
        Use only the first ``max_rows`` rows of ``source``.

    Returns
    -------
    int
        Rows written by this call in this process (rows skipped on resume are not counted).

    Raises
    ------
    InputError
        If ``source`` cannot be read or ``out_path`` holds something other than result records.

    Notes
    -----
    The model stays patched for the whole run and is restored afterwards, also after an error.
    Results do not depend on how rows were batched (padding gets zero relevance; target positions
    are counted in real tokens).
    """
    from accelerate import PartialState

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    for name, value in (("target", target), ("contrast", contrast)):
        if isinstance(value, (list, tuple)):
            raise InputError(
                f"{name} must be one {name} for every row or a callable (text, meta) -> {name}, "
                f"got a {type(value).__name__}"
            )
    rows = _load_rows(source, column, max_rows)
    # without any accelerator, processes spawned by `accelerate launch --multi_gpu` or torchrun talk over gloo
    state = PartialState(cpu=not torch.accelerator.is_available())
    n, rank = state.num_processes, state.process_index
    out = Path(out_path)
    if state.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in [out, *_shards(out)]:
                stale.unlink(missing_ok=True)
        else:
            _finalize(out)  # fold in shards of a killed parallel run; cut a truncated last line
    state.wait_for_everyone()
    done = set(_read_lines(out, repair=False)) if resume else set()
    mine = sorted(
        (r for r in rows if r.index % n == rank and r.index not in done),
        key=lambda r: (-len(r.text), r.index),
    )
    written = 0
    if mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="row", disable=not progress or not state.is_main_process)
        dest = out if n == 1 else out.with_name(f"{out.name}.rank{rank}")
        with open(dest, "a", encoding="utf-8") as fh, explaining(model, rules):
            empty = [r for r in mine if not r.text.strip()]
            for r in empty:
                fh.write(
                    json.dumps(
                        {
                            "index": r.index,
                            "text": r.text,
                            "meta": r.meta,
                            "error": "InputError: the text is empty or whitespace only",
                        }
                    )
                    + "\n"
                )
            written += len(empty)
            bar.update(len(empty))
            todo = [r for r in mine if r.text.strip()]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                for rec in _records(model, chunk, tokenizer, rules, target, contrast):
                    fh.write(json.dumps(rec, default=str) + "\n")
                fh.flush()
                written += len(chunk)
                bar.update(len(chunk))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        _finalize(out)
    state.wait_for_everyone()
    return written
