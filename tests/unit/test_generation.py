"""explain_generation: each row equals a separate explain call; causality; greedy generation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lxt_plus
from lxt_plus import explain
from lxt_plus.errors import InputError, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build, tiny_tokenizer  # noqa: E402

PROMPT = torch.tensor([5, 17, 33, 8, 61, 2, 40])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return build(request.param).float()


@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp", "pa-attnlrp", "pa-ah-lrp"])
def test_rows_equal_single_explanations(model: torch.nn.Module, rules: str) -> None:
    gen = lxt_plus.explain_generation(model, None, PROMPT, 5, rules=rules)
    n_p, ids = gen.prompt_length, gen.token_ids
    assert gen.matrix.shape == (len(ids) - n_p, len(ids)) and gen.rules == rules
    for t in range(gen.matrix.shape[0]):
        single = explain(model, ids[: n_p + t], target=int(ids[n_p + t]), rules=rules)
        torch.testing.assert_close(gen.matrix[t, : n_p + t], single.relevance, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gen.target_logit[t], single.target_logit[0], rtol=1e-5, atol=1e-6)


def test_causality(model: torch.nn.Module) -> None:
    gen = lxt_plus.explain_generation(model, None, PROMPT, 6)
    n_g, width = gen.matrix.shape
    for t in range(n_g):
        assert torch.all(gen.matrix[t, gen.prompt_length + t :] == 0)
        assert gen.matrix[t, : gen.prompt_length].abs().sum() > 0
    assert torch.all(gen.matrix[:, -1] == 0)


def test_greedy_generation_matches_generate(model: torch.nn.Module) -> None:
    gen = lxt_plus.explain_generation(model, None, PROMPT, 6)
    with torch.no_grad():
        out = model.generate(
            PROMPT[None],
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    assert gen.token_ids.tolist() == out[0].tolist()
    assert all(p.requires_grad for p in model.parameters())  # frozen only while explaining


def test_stops_at_eos() -> None:
    model = build("llama")
    first = lxt_plus.explain_generation(model, None, PROMPT, 4)
    eos = int(first.token_ids[len(PROMPT) + 1])  # make the second generated token the end of sequence
    model.generation_config.eos_token_id = eos
    gen = lxt_plus.explain_generation(model, None, PROMPT, 8)
    assert gen.token_ids[len(PROMPT) :].tolist() == first.token_ids[len(PROMPT) : len(PROMPT) + 2].tolist()


def test_continuation_and_batched_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build("llama")
    cont = torch.tensor([9, 10, 11, 12, 13])
    full = lxt_plus.explain_generation(model, None, PROMPT, continuation=cont)
    assert full.token_ids.tolist() == PROMPT.tolist() + cont.tolist()
    import lxt_plus.api.generation as generation

    monkeypatch.setattr(generation, "_MAX_CHUNK", 2)  # chunks of 2, 2, 1 targets
    torch.testing.assert_close(
        lxt_plus.explain_generation(model, None, PROMPT, continuation=cont.tolist()).matrix,
        full.matrix,
        rtol=1e-6,
        atol=1e-7,
    )
    monkeypatch.setattr(generation, "_MAX_CHUNK", 1)  # one backward pass per target
    torch.testing.assert_close(
        lxt_plus.explain_generation(model, None, PROMPT, continuation=cont).matrix,
        full.matrix,
        rtol=1e-6,
        atol=1e-7,
    )


def test_text_prompt_with_tokenizer() -> None:
    gen = lxt_plus.explain_generation(
        build("llama"), tiny_tokenizer(), "the dog is", continuation="a good film"
    )
    assert gen.prompt_tokens == ["the", "dog", "is"] and gen.generated_tokens == ["a", "good", "film"]
    assert gen.matrix.shape == (3, 6)


def test_errors() -> None:
    model = build("llama")
    with pytest.raises(InputError, match="max_new_tokens"):
        lxt_plus.explain_generation(model, None, PROMPT, 0)
    with pytest.raises(InputError, match="needs a tokenizer"):
        lxt_plus.explain_generation(model, None, "text", 2)
    with pytest.raises(InputError, match="empty"):
        lxt_plus.explain_generation(model, None, PROMPT, continuation=[])
    with pytest.raises(InputError, match="vocabulary"):
        lxt_plus.explain_generation(model, None, PROMPT, continuation=[1000])
    with pytest.raises(UnsupportedModelError, match="causal LM"):
        lxt_plus.explain_generation(build("bert"), None, PROMPT, 2)
    with pytest.raises(lxt_plus.LxtPlusError, match="did you mean 'attnlrp'"):
        lxt_plus.explain_generation(model, None, PROMPT, 2, rules="atnlrp")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_targets_share_one_batched_backward(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention rules' backward supports batched upstream gradients: no per-target fallback."""
    model = build("llama")
    model.set_attn_implementation(impl)
    batched: list[bool] = []
    real = torch.autograd.grad

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        batched.append(bool(kwargs.get("is_grads_batched")))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    lxt_plus.explain_generation(model, None, PROMPT, 4, rules="attnlrp")
    assert batched == [True]
