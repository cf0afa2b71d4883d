"""The small trainings of the demo models: the MiniLM sentiment classifier (fine-tuned once, then
cached), a ViT on scikit-learn's digits and an MLP on the breast-cancer table.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lxt_plus.demo.assets import cache_dir, minilm_path, require, single_thread
from lxt_plus.demo.datasets import sentiment_split
from lxt_plus.engine.hf import quiet_transformers
from lxt_plus.errors import InputError

SENTIMENT_LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


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
    require("sklearn", "scikit-learn")
    from sklearn.model_selection import train_test_split

    return train_test_split(X, y, test_size=test_size, random_state=seed, stratify=y)


def _digits_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(n, 1, 8, 8)`` images in ``[-1, 1]``, split stratified:
    ``X_train, X_test, y_train, y_test``."""
    require("sklearn", "scikit-learn")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return _sklearn_split(images, labels, seed)


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
    with single_thread(), tqdm(total=steps, desc=desc, disable=not progress) as bar:
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
    from transformers import ViTConfig, ViTForImageClassification

    X_train, X_test, y_train, y_test = _digits_split(seed)
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
    require("sklearn", "scikit-learn")
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


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class DualEncoderResult:
    """A small CLIP-style dual encoder trained on scikit-learn's digits and their label words.

    Attributes
    ----------
    model : transformers.CLIPModel
        In eval mode; images ``(batch, 1, 8, 8)``, captions ``[<bos>, "digit", word, <eos>]``.
    captions : torch.Tensor
        ``(10, 4)``: the token ids of the caption of each digit, ``"digit zero"`` ... ``"digit nine"``.
    tokens : list of list of str
        The caption tokens as text.
    X_test, y_test : torch.Tensor
        Held-out images ``(n_test, 1, 8, 8)`` (pixels in ``[-1, 1]``) and their labels.
    test_accuracy : float
        How often the caption of the right digit has the highest similarity.
    """

    model: Any
    captions: torch.Tensor
    tokens: list[list[str]]
    X_test: torch.Tensor
    y_test: torch.Tensor
    test_accuracy: float


def train_clip_digits(*, seed: int = 0, epochs: int = 20, progress: bool = True) -> DualEncoderResult:
    """Train a tiny CLIP (vision and text towers of two layers, 48 wide) to match each 8x8 digit
    with the caption naming it, ``"digit seven"`` (half a minute on a CPU).

    The loss is CLIP's image-to-text cross-entropy over the ten captions. A stratified fifth of the
    1,797 images is held out.
    """
    from transformers import CLIPConfig, CLIPModel

    X_train, X_test, y_train, y_test = _digits_split(seed)
    vocab = ["<pad>", "<bos>", "<eos>", "digit", *DIGIT_WORDS]
    captions = torch.tensor([[1, 3, 4 + k, 2] for k in range(10)])
    small = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(vocab),
            "max_position_embeddings": 8,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        vision_config={**small, "image_size": 8, "patch_size": 2, "num_channels": 1},
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)

    def similarities(m: Any, x: torch.Tensor) -> torch.Tensor:
        return m(input_ids=captions, pixel_values=x).logits_per_image  # (batch, 10)

    _fit(
        model,
        X_train,
        y_train,
        epochs=epochs,
        batch_size=64,
        lr=3e-3,
        seed=seed,
        progress=progress,
        desc="training a dual encoder on digits",
        call=similarities,
    )
    with torch.no_grad():
        accuracy = float((similarities(model, X_test).argmax(-1) == y_test).float().mean())
    tokens = [[vocab[i] for i in row] for row in captions.tolist()]
    return DualEncoderResult(model, captions, tokens, X_test, y_test, accuracy)
