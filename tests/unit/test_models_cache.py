"""The sentiment classifier's cache: atomic writes, one trainer at a time, the main process under
torch.distributed, a cache key that follows the recipe. Training itself is faked here (the real one
runs in tests/usecases/test_models.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lxt_plus.demo import training as models
from lxt_plus.errors import InputError


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    """Replace the fine-tuning by a slow fake that saves a folder atomically, and loading by a stub."""
    state = SimpleNamespace(trained=0, running=0, overlap=False, delay=0.3)
    monkeypatch.setenv("LXT_PLUS_CACHE", str(tmp_path / "cache"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)

    def train(path: Path, settings: dict[str, Any], progress: bool) -> SimpleNamespace:
        state.running += 1
        state.overlap |= state.running > 1
        time.sleep(state.delay)
        state.trained += 1

        def write(folder: Path) -> None:
            (folder / "config.json").write_text("{}")
            (folder / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5 + state.trained / 100}))

        models._save_folder_atomically(path, write)
        state.running -= 1
        return SimpleNamespace(path=path, trained=True)

    def load(path: Path) -> SimpleNamespace:
        accuracy = json.loads((path / "metrics.json").read_text())["test_accuracy"]
        return SimpleNamespace(path=path, trained=False, test_accuracy=accuracy)

    monkeypatch.setattr(models, "_train_sentiment", train)
    monkeypatch.setattr(models, "_load_saved", load)
    return state


def test_cache_key_follows_the_recipe(fake_training: SimpleNamespace, tmp_path: Path) -> None:
    first = models.train_sentiment(progress=False)
    assert first.trained and first.path.parent == tmp_path / "cache"
    assert first.path.name.startswith("sentiment-minilm-") and first.path.name != "sentiment-minilm"
    assert not models.train_sentiment(progress=False).trained  # the same recipe: reused
    other = models.train_sentiment(progress=False, max_length=32)
    assert other.trained and other.path != first.path  # another recipe: another folder
    key = models._recipe_key({**models.SENTIMENT_RECIPE, "max_train": None, "max_test": None})
    assert first.path.name == f"sentiment-minilm-{key}"


def test_writes_are_atomic(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def half(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        models._save_folder_atomically(target, half)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder is left
    models._save_folder_atomically(target, lambda f: (f / "config.json").write_text("1"))
    models._save_folder_atomically(target, lambda f: (f / "config.json").write_text("2"))  # replaced
    assert (target / "config.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_refuses_to_replace_a_folder_of_other_files(fake_training: SimpleNamespace, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds other files than a saved model"):
        models.train_sentiment(mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert models.train_sentiment(empty, progress=False).trained


def test_concurrent_callers_train_once(fake_training: SimpleNamespace) -> None:
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.train_sentiment(progress=False)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake_training.trained == 1 and not fake_training.overlap
    assert sorted(r.trained for r in results) == [False, False, True]


def test_distributed_only_the_main_process_trains(
    fake_training: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(models, "_rank", lambda: (1, 2))
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(models.train_sentiment(progress=False)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and fake_training.trained == 0  # rank 1 waits, it does not train
    monkeypatch.setattr(models, "_rank", lambda: (0, 2))
    main = models.train_sentiment(progress=False)  # rank 0 trains
    waiter.join(timeout=30)
    assert main.trained and fake_training.trained == 1
    assert got and not got[0].trained and got[0].path == main.path


def test_notice_before_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one-line notice comes before any weights are loaded (the loading is stopped right there)."""

    class Stop(Exception):
        pass

    def stop() -> str:
        raise Stop

    monkeypatch.setenv("LXT_PLUS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "sentiment_split", lambda seed: ([("good", 1)] * 6824, [("bad", 0)] * 10))
    monkeypatch.setattr(models, "minilm_path", stop)
    with pytest.raises(Stop):
        models.train_sentiment(progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        "lxt_plus: fine-tuning the sentiment classifier once (all-MiniLM-L6-v2 on 6,824 "
    )
    assert " min on this CPU); it is cached in " + str(tmp_path / "sentiment-minilm-") in err[0]
    assert list(tmp_path.glob("sentiment-minilm-*")) == []  # nothing half-written
