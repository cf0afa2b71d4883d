"""Hostile and broken input: a clear lxt_plus error or a documented result, and the model left as it was.

After every failure the model must not be patched and must compute bit-identical outputs.
"""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build, tiny_vit  # noqa: E402

import lxt_plus  # noqa: E402
from lxt_plus import explain, patch  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402
from lxt_plus.errors import (  # noqa: E402
    AlreadyPatchedError,
    ConfigError,
    ContextTooLongError,
    InputError,
    LxtPlusWarning,
    PresetError,
    TargetError,
    TokenizerMismatchError,
    UnsupportedModelError,
)

WORDS = "the movie was good bad great boring plot actor scene story and but not very".split()
UNICODE = ["héllo wörld", "😀 🎬 good", "שלום עולם", "مرحبا بالعالم", "日本語 テキスト", "naïve café ﬁlm"]


def tiny_tokenizer(extra: list[str] = (), vocab_size: int = 96) -> Any:  # type: ignore[assignment]
    """A word-level tokenizer trained offline; ``[PAD]`` is id 0 (the tiny models' pad id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator([" ".join(WORDS), *UNICODE, *extra], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


@pytest.fixture
def llama() -> nn.Module:
    return build("llama")


IDS = torch.tensor([[5, 9, 14, 3, 22, 41, 7]])


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        if getattr(model, "main_input_name", "") == "pixel_values":
            return model(pixel_values=torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)).logits
        return model(input_ids=IDS).logits


def assert_untouched(model: nn.Module, before: torch.Tensor) -> None:
    assert not is_patched(model)
    assert torch.equal(outputs(model), before)


def fails(model: nn.Module, error: type[Exception], match: str, *args: Any, **kwargs: Any) -> None:
    """``explain(model, *args, **kwargs)`` raises ``error`` (message ~ ``match``); the model is unchanged."""
    before = outputs(model)
    with pytest.raises(error, match=match):
        explain(model, *args, **kwargs)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------ text
@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_empty_and_whitespace_text(llama: nn.Module, tok: Any, text: str) -> None:
    fails(llama, InputError, "empty or whitespace only", text, tokenizer=tok)
    fails(llama, InputError, "text 1 is empty", ["the movie", text], tokenizer=tok)


def test_empty_tensor_and_empty_list(llama: nn.Module) -> None:
    fails(llama, InputError, "seq > 0", torch.zeros(1, 0, dtype=torch.long))
    fails(llama, InputError, "empty list", [])


def test_text_longer_than_max_positions(llama: nn.Module, tok: Any) -> None:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(70))  # 70 tokens > 64 positions
    fails(
        llama, ContextTooLongError, "70 tokens but LlamaForCausalLM accepts at most 64", text, tokenizer=tok
    )
    fails(llama, ContextTooLongError, "at most 64 positions", torch.randint(2, 90, (1, 65)))


def test_mixed_length_batch_equals_single_rows(llama: nn.Module, tok: Any) -> None:
    texts = ["the movie", "the movie was very good and not boring", "plot actor scene"]
    batch = explain(llama, texts, tokenizer=tok)
    assert batch.relevance.shape == (3, 8) and torch.isfinite(batch.relevance).all()
    for r, text in enumerate(texts):
        single = explain(llama, text, tokenizer=tok)
        tokens, rel = batch.real_tokens(r)
        assert tokens == text.split() == single.tokens[0]
        torch.testing.assert_close(rel, single.relevance, rtol=1e-4, atol=1e-5)
        assert batch.targets[r].ids == single.target.ids
        assert (batch.relevance[r, len(tokens) :] == 0).all()


@pytest.mark.parametrize("text", UNICODE)
def test_unicode_emoji_and_right_to_left_text(llama: nn.Module, tok: Any, text: str) -> None:
    exp = explain(llama, text, tokenizer=tok)
    assert exp.tokens[0] == text.split() and "[UNK]" not in exp.tokens[0]
    assert torch.isfinite(exp.relevance).all() and exp.relevance.shape == (len(text.split()),)
    assert lxt_plus.Explanation.from_json(exp.to_json()).tokens == exp.tokens
    assert text.split()[0] in exp.to_html()


# ------------------------------------------------------------------------------------ model state
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_train_mode_model(family: str) -> None:
    model = (
        build(family, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
        if family == "gpt2"
        else build(family, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    )
    ids = IDS if family == "gpt2" else IDS.clamp(max=60)
    reference = explain(model, ids)  # eval mode
    model.train()
    first, second = explain(model, ids), explain(model, ids)
    torch.testing.assert_close(first.relevance, reference.relevance, rtol=0, atol=0)  # dropout was off
    torch.testing.assert_close(second.relevance, first.relevance, rtol=0, atol=0)
    assert all(m.training for m in model.modules()) and not is_patched(model)


def test_already_patched_same_preset_nests(llama: nn.Module) -> None:
    reference = explain(llama, IDS)
    with patch(llama, "attnlrp") as handle:
        exp = explain(llama, IDS)
        assert is_patched(llama) and handle.active  # explain left the outer patch in place
    torch.testing.assert_close(exp.relevance, reference.relevance, rtol=0, atol=0)
    assert not is_patched(llama)


def test_already_patched_other_preset(llama: nn.Module) -> None:
    before = outputs(llama)
    with patch(llama, "ah-lrp"):
        with pytest.raises(AlreadyPatchedError, match="already patched with preset 'ah-lrp'.*'attnlrp'"):
            explain(llama, IDS, rules="attnlrp")
        assert is_patched(llama)
    assert_untouched(llama, before)


def test_patched_by_another_library(llama: nn.Module) -> None:
    """Instance forwards set by someone else are wrapped while explaining and restored exactly."""
    reference = explain(llama, IDS)
    calls = {"norm": 0, "model": 0}
    norm = llama.model.norm
    layer_norm = llama.model.layers[0].input_layernorm

    def counting_norm(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        calls["norm"] += 1
        return type(self).forward(self, hidden)

    norm.forward = types.MethodType(counting_norm, norm)
    foreign_norm = norm.__dict__["forward"]

    @functools.wraps(llama.forward)
    def counting_model(*args: Any, **kwargs: Any) -> Any:
        calls["model"] += 1
        return type(llama).forward(llama, *args, **kwargs)

    llama.forward = counting_model
    plain_layer_norm = layer_norm.forward.__func__
    before = outputs(llama)
    calls.update(norm=0, model=0)
    exp = explain(llama, IDS)
    assert calls["norm"] >= 1 and calls["model"] >= 1, "the other library's forwards must still run"
    torch.testing.assert_close(exp.relevance, reference.relevance, rtol=0, atol=0)  # and our rules too
    assert norm.__dict__["forward"] is foreign_norm and llama.__dict__["forward"] is counting_model
    assert "forward" not in layer_norm.__dict__ and layer_norm.forward.__func__ is plain_layer_norm
    assert_untouched(llama, before)


def test_parameters_requiring_grad_are_restored(llama: nn.Module) -> None:
    llama.model.embed_tokens.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in llama.named_parameters()}
    assert sum(flags.values()) > 1
    explain(llama, IDS)
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags
    assert all(p.grad is None for p in llama.parameters()), "no weight gradient may be computed"
    with pytest.raises(TargetError):
        explain(llama, IDS, target=10_000)
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == flags


class Scaler(nn.Module):
    """A custom leaf module with a parameter that no preset knows."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Exponential(nn.Module):
    """A custom leaf module that computes something no rule covers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.exp() - 1.0


def test_unsupported_module(llama: nn.Module) -> None:
    llama.model.layers[1].post_attention_layernorm = nn.Sequential(
        llama.model.layers[1].post_attention_layernorm, Exponential()
    )
    where = (
        r"exp in model\.layers\.1\.post_attention_layernorm\.1 \(Exponential; would fit: an element-wise rule"
    )
    fails(llama, UnsupportedModelError, where, IDS)
    fails(llama, UnsupportedModelError, "strict=False", IDS)
    with pytest.warns(LxtPlusWarning, match="NOT conservative"):
        exp = explain(llama, IDS, strict=False)
    assert torch.isfinite(exp.relevance).all() and not is_patched(llama)


def test_linear_module_of_unknown_role_needs_no_rule(llama: nn.Module) -> None:
    """A module that only scales by a parameter is linear: the operation check accepts it, and
    relevance still sums to the logit with biases zeroed."""
    llama.model.layers[1].post_attention_layernorm = nn.Sequential(
        llama.model.layers[1].post_attention_layernorm, Scaler(32)
    )
    exp = explain(llama, IDS, rules="conservative-check")
    c = exp.conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))


# ------------------------------------------------------------------------------------ configuration
def test_unknown_preset(llama: nn.Module) -> None:
    fails(llama, PresetError, "unknown preset 'atnlrp' \\(did you mean 'attnlrp'\\?\\)", IDS, rules="atnlrp")
    fails(llama, PresetError, "did you mean 'ah-lrp'", IDS, rules="ah_lrp")


def test_malformed_yaml(llama: nn.Module, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: mine\nrules: [\n  - select: norm\n    rule: {conservative-norm\n")
    fails(llama, ConfigError, "broken.yaml: malformed YAML", IDS, rules=str(broken))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: mine\nrulez: []\n")
    fails(llama, ConfigError, "unknown key 'rulez' \\(did you mean 'rules'\\?\\)", IDS, rules=str(wrong))
    fails(llama, ConfigError, "does not exist", IDS, rules=str(tmp_path / "missing.yaml"))


def test_target_out_of_range(llama: nn.Module, tok: Any) -> None:
    fails(llama, TargetError, "token id 96 is out of range: valid ids are 0..95", IDS, target=96)
    fails(llama, TargetError, "token id -1 is out of range", IDS, target=-1)
    fails(llama, TargetError, "position 7 is out of range", IDS, position=7)
    fails(
        llama,
        TargetError,
        "'zebra' is not in the tokenizer's vocabulary",
        "the movie",
        target="zebra",
        tokenizer=tok,
    )
    classifier = build("llama", head="seqcls")
    fails(classifier, TargetError, "class 3 is out of range: the model has 3 classes", IDS, target=3)
    fails(classifier, TargetError, "unknown target label 'happy'", IDS, target="happy")


def test_position_that_is_not_an_index_and_a_contrast_equal_to_the_target(llama: nn.Module) -> None:
    fails(llama, TargetError, r"position must be a token index \(an int\), got 1.5", IDS, position=1.5)
    fails(llama, TargetError, r"position must be a token index \(an int\), got True", IDS, position=True)
    at = explain(llama, IDS, position=torch.tensor(3)).target_logit
    assert torch.equal(at, explain(llama, IDS, position=3).target_logit)  # a 0-d integer tensor is an index
    fails(llama, TargetError, "the contrast is the target itself", IDS, target=5, contrast=5)
    classifier = build("llama", head="seqcls")
    fails(classifier, TargetError, "the contrast is the target itself", IDS, target=1, contrast=1)


@pytest.mark.parametrize(
    "call",
    [
        lambda m: lxt_plus.explain(m, IDS),
        lambda m: lxt_plus.explain_generation(m, None, IDS[0], max_new_tokens=2),
        lambda m: lxt_plus.patch(m),
        lambda m: lxt_plus.tune(m, [IDS]),
        lambda m: lxt_plus.evaluate(m, IDS, ["attnlrp"]),
        lambda m: lxt_plus.explain_similarity(m, {}),
    ],
    ids=["explain", "explain_generation", "patch", "tune", "evaluate", "explain_similarity"],
)
def test_a_model_name_instead_of_a_model(call: Any) -> None:
    with pytest.raises(InputError, match=r"needs a torch module \(a transformers model\), got str; load one"):
        call("HuggingFaceTB/SmolLM2-135M")


def test_token_ids_beyond_the_vocabulary(llama: nn.Module) -> None:
    fails(
        llama,
        TokenizerMismatchError,
        "token id 500 is outside LlamaForCausalLM's vocabulary of 96: the tokenizer does not match the model",
        torch.tensor([[3, 500, 4]]),
    )


def test_tokenizer_that_does_not_match_the_model(llama: nn.Module) -> None:
    big = tiny_tokenizer([f"w{i}" for i in range(150)], vocab_size=200)
    text = "the " + " ".join(f"w{i}" for i in range(0, 150, 7))
    assert max(big(text)["input_ids"]) >= 96
    fails(llama, TokenizerMismatchError, "outside LlamaForCausalLM's vocabulary of 96", text, tokenizer=big)


def test_wrong_input_dtypes(llama: nn.Module) -> None:
    fails(llama, InputError, "takes integer token ids, got a torch.float32 tensor", IDS.float())
    fails(llama, InputError, "takes integer token ids", torch.randn(1, 7, 32))
    vit = tiny_vit()
    fails(
        vit, InputError, "takes float inputs, got an integer tensor", torch.ones(1, 1, 8, 8, dtype=torch.long)
    )
    fails(llama, InputError, "text input needs tokenizer=", "the movie")
    fails(llama, InputError, "got dict_keys|needs 'input_ids' or 'pixel_values'", {"ids": IDS})


def test_nan_weights_and_float16_never_give_a_nan_heatmap(llama: nn.Module) -> None:
    from lxt_plus.errors import NumericalError

    half = build("llama").to(torch.float16)
    try:
        exp = explain(half, IDS)
    except NumericalError as exc:  # documented: float16 may overflow; the message says what to use
        assert "bfloat16" in str(exc) and not is_patched(half)
    else:
        assert torch.isfinite(exp.relevance).all()
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="target logit is \\[nan\\]"):
        explain(llama, IDS)
    assert not is_patched(llama)
