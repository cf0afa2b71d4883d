"""Threads explaining different models with different presets do not interfere with each other, nor with
a model that nobody patched."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402

from lxt_plus import explain  # noqa: E402
from lxt_plus.engine.patching import is_patched  # noqa: E402

ITERATIONS = 12
IDS = torch.tensor([[5, 9, 14, 3, 22, 41, 7, 8], [11, 12, 13, 17, 2, 0, 0, 0]])
MASK = (IDS != 0).long()


def lrp(model: nn.Module, rules: str) -> Callable[[], torch.Tensor]:
    return lambda: explain(model, IDS, attention_mask=MASK, rules=rules).relevance


def plain_gradient_x_input(model: nn.Module) -> Callable[[], torch.Tensor]:
    """Gradient×Input with plain autograd on a model lxt_plus never touches."""

    def run() -> torch.Tensor:
        emb = model.get_input_embeddings()(IDS).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=MASK).logits[:, -1].max(-1).values.sum()
        (grad,) = torch.autograd.grad(out, emb)
        return (emb * grad).sum(-1).detach()

    return run


def run_concurrently(jobs: dict[str, Callable[[], torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    results: dict[str, list[torch.Tensor]] = {name: [] for name in jobs}
    spans: dict[str, tuple[float, float]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(name: str) -> None:
        try:
            barrier.wait()
            start = time.perf_counter()
            for _ in range(ITERATIONS):
                results[name].append(jobs[name]())
            spans[name] = (start, time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    assert max(a for a, _ in spans.values()) < min(b for _, b in spans.values()), (
        "the threads did not overlap"
    )
    return results


@pytest.mark.parametrize("pair", ["llama+gpt2", "llama+llama-shared-config"])
def test_threads_do_not_interfere(pair: str) -> None:
    first = build("llama", seed=0)
    if pair == "llama+gpt2":
        second = build("gpt2", seed=1)
    else:  # the attention implementation lives on the config: a shared config is the hard case
        torch.manual_seed(1)
        second = type(first)(first.config).eval()
    bystander = build("qwen2", seed=2)
    jobs = {
        "attnlrp": lrp(first, "attnlrp"),
        "ah-lrp": lrp(second, "ah-lrp"),
        "plain": plain_gradient_x_input(bystander),
    }
    expected = {name: job() for name, job in jobs.items()}  # single-threaded
    results = run_concurrently(jobs)
    for name, values in results.items():
        assert len(values) == ITERATIONS
        for value in values:
            assert torch.equal(value, expected[name]), name
    assert not any(is_patched(m) for m in (first, second, bystander))
    assert first.config._attn_implementation == "sdpa"
