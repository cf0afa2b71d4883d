"""Faithfulness metrics and baselines on models where the right answer is known."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lxt_plus.errors import InputError, TargetError
from lxt_plus.evaluation.baselines import (
    attention_rollout,
    gradient_x_input,
    integrated_gradients,
    last_layer_attention,
)
from lxt_plus.evaluation.evaluate import (
    abpc,
    aopc_comprehensiveness,
    aopc_sufficiency,
    evaluate,
    perturbation_curves,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build, tiny_tokenizer  # noqa: E402


class BagOfWords(nn.Module):
    """``logits = W Σ_t e_t`` with ``W[1] = -W[0]``: token ``t`` contributes exactly ``W[c]·e_t`` to the
    logit of class ``c``, zeroing its embedding deletes it, and the probability is monotone in the logit."""

    def __init__(self, vocab: int = 30, d: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, 2, bias=False)
        with torch.no_grad():
            self.out.weight[1] = -self.out.weight[0]
        self.double()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return SimpleNamespace(logits=self.out(x.sum(1)))

    def contributions(self, ids: torch.Tensor, c: int) -> torch.Tensor:
        return (self.embed.weight[ids] @ self.out.weight[c]).detach()


def truth(model, input_ids, attention_mask, target_ids):
    return torch.stack([model.contributions(i, int(t)) for i, t in zip(input_ids, target_ids, strict=True)])


def reversed_truth(model, input_ids, attention_mask, target_ids):
    return -truth(model, input_ids, attention_mask, target_ids)


@pytest.fixture()
def bag():
    model = BagOfWords()
    ids = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(1))
    target = int(model(ids[None]).logits.argmax())
    return model, ids, target


class DeletionSpy(nn.Module):
    """Reports which tokens a perturbed copy still has: logit 0 counts the tokens whose embedding is
    not the (zero) replacement, logit 1 is the bit mask ``Σ 2^t`` over those positions ``t``."""

    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 2)
        with torch.no_grad():
            self.embed.weight.fill_(1.0)
        self.double()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        present = (x != 0).any(-1).double()
        bits = 2.0 ** torch.arange(x.shape[1], dtype=torch.float64)
        return SimpleNamespace(logits=torch.stack([present.sum(1), present @ bits], 1))


def removed_positions(mask_logit: torch.Tensor, n: int) -> set[int]:
    present = int(mask_logit.round())
    return {t for t in range(n) if not present >> t & 1}


@pytest.mark.parametrize(
    ("n", "steps", "expected"),
    [
        (7, 10, [0, 1, 1, 2, 3, 4, 4, 5, 6, 6, 7]),  # 3.5 -> 4 at k = 5
        (13, 4, [0, 3, 7, 10, 13]),  # 3.25 -> 3, 6.5 -> 7, 9.75 -> 10
        (3, 10, [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]),  # fewer tokens than steps
        (10, 10, list(range(11))),
    ],
    ids=["7-tokens-10-steps", "13-tokens-4-steps", "3-tokens-10-steps", "10-tokens-10-steps"],
)
def test_tokens_removed_per_step_for_uneven_counts(n: int, steps: int, expected: list[int]) -> None:
    """Step ``k`` replaces ``k·n/steps`` tokens rounded to the nearest integer, halves up, in MoRF
    and LeRF alike; MoRF takes them from the most relevant end, LeRF from the least relevant."""
    model = DeletionSpy()
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 30, (n,), generator=gen)
    rel = torch.randperm(n, generator=gen).double()  # distinct: no ties
    counts = perturbation_curves(model, ids, rel, 0, steps=steps)
    masks = perturbation_curves(model, ids, rel, 1, steps=steps)
    assert (n - counts.morf_logit).round().long().tolist() == expected
    assert (n - counts.lerf_logit).round().long().tolist() == expected
    most = torch.argsort(rel, descending=True).tolist()
    for k, m in enumerate(expected):
        assert removed_positions(masks.morf_logit[k], n) == set(most[:m]), k
        assert removed_positions(masks.lerf_logit[k], n) == set(most[n - m :]), k


def test_true_contributions_give_maximal_abpc_and_reversed_minimal(bag):
    model, ids, c = bag
    true = model.contributions(ids, c)

    def score(rel: torch.Tensor) -> float:
        return abpc(perturbation_curves(model, ids, rel, c))

    best, worst = score(true), score(-true)
    s = true.sort(descending=True).values  # LeRF_k − MoRF_k = Σ top-k − Σ bottom-k, one token per step
    expected = sum(float(s[:k].sum() - s.flip(0)[:k].sum()) for k in range(11)) / 11 / abs(float(true.sum()))
    assert best == pytest.approx(expected)
    assert worst == pytest.approx(-best)
    gen = torch.Generator().manual_seed(0)
    randoms = [score(torch.randperm(10, generator=gen).double()) for _ in range(60)]
    assert all(worst - 1e-9 <= r <= best + 1e-9 for r in randoms)
    mean = sum(randoms) / len(randoms)
    assert worst < mean < best
    assert abs(mean) < 0.25 * best


def test_aopc_matches_token_deletion_and_is_optimal_for_the_truth(bag):
    model, ids, c = bag
    true = model.contributions(ids, c)
    curves = perturbation_curves(model, ids, true, c)
    order = true.argsort(descending=True)

    def prob(keep: torch.Tensor) -> float:  # zero embedding == deleting the token from the bag
        with torch.no_grad():
            logits = model(ids[keep][None]).logits if keep.numel() else torch.zeros(1, 2, dtype=torch.float64)
        return float(torch.softmax(logits, -1)[0, c])

    p0 = prob(torch.arange(10))
    comp = sum(p0 - prob(order[k:]) for k in range(1, 11)) / 10
    suff = sum(p0 - prob(order[:k]) for k in range(1, 11)) / 10
    assert aopc_comprehensiveness(curves) == pytest.approx(comp)
    assert aopc_sufficiency(curves) == pytest.approx(suff)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        other = perturbation_curves(model, ids, torch.randperm(10, generator=gen).double(), c)
        assert aopc_comprehensiveness(other) <= aopc_comprehensiveness(curves) + 1e-9
        assert aopc_sufficiency(other) >= aopc_sufficiency(curves) - 1e-9


def test_replacement_token_embedding_is_used(bag):
    model, ids, c = bag
    curves = perturbation_curves(model, ids, torch.arange(10.0), c, replacement=7)
    full = 10 * float(model.contributions(torch.tensor([7]), c)[0])
    assert float(curves.morf_logit[-1]) == pytest.approx(full)
    assert float(curves.lerf_logit[-1]) == pytest.approx(full)
    with pytest.raises(InputError, match="tokenizer"):
        perturbation_curves(model, ids, torch.arange(10.0), c, replacement="x")


def test_evaluate_ranks_methods_on_the_linear_model():
    model = BagOfWords()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 30, (6, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, :3] = 0
    methods = {
        "truth": truth,
        "reversed": reversed_truth,
        "gradient": "gradient",
        "attnlrp": "attnlrp",
        "ig": "integrated_gradients",
        "random": "random",
    }
    report = evaluate(model, {"input_ids": ids, "attention_mask": mask}, methods)
    s = report.summary()
    assert s["gradient"]["abpc"] == pytest.approx(s["truth"]["abpc"])
    assert s["ig"]["abpc"] == pytest.approx(s["truth"]["abpc"])
    assert s["reversed"]["abpc"] == pytest.approx(-s["truth"]["abpc"])
    assert s["reversed"]["abpc"] < s["random"]["abpc"] < s["truth"]["abpc"]
    assert s["attnlrp"]["conservation_error"] == pytest.approx(0.0, abs=1e-9)
    assert s["truth"]["conservation_error"] is None
    assert report.best() == "truth" or s[report.best()]["abpc"] == pytest.approx(s["truth"]["abpc"])
    # padding is stripped, never perturbed: the same as the unpadded rows one by one
    rows = [ids[r, mask[r].bool()] for r in range(6)]
    again = evaluate(model, rows, {"truth": truth})
    assert torch.allclose(again["truth"].abpc, report["truth"].abpc)
    assert report["truth"].morf_logit.shape == (6, 11)
    table = report.table()
    assert table.splitlines()[0].startswith("| method") and "| reversed" in table
    assert "random" in report.table("plain")
    json.dumps(report.to_dict())


def test_report_plot():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model = BagOfWords()
    report = evaluate(model, torch.randint(0, 30, (2, 8)), {"truth": truth, "random": "random"}, steps=4)
    fig = report.plot()
    assert len(fig.axes[0].lines) == 4
    assert report.fractions == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_gradient_baselines_equal_exact_contributions_on_linear_model(bag):
    model, ids, c = bag
    exact = model.contributions(ids, c).float()
    mask, tid = torch.ones(1, 10, dtype=torch.long), torch.tensor([c])
    assert torch.allclose(integrated_gradients(model, ids[None], mask, tid, steps=8)[0], exact, atol=1e-6)
    assert torch.allclose(gradient_x_input(model, ids[None], mask, tid)[0], exact, atol=1e-6)


class TanhBag(BagOfWords):
    """A non-linear bag of words: ``logits = W tanh(V Σ_t e_t + b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 6).double()

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None):
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return SimpleNamespace(logits=self.out(torch.tanh(self.hidden(x.sum(1)))))


def test_integrated_gradients_completeness_and_batching():
    model = TanhBag()
    ids = torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[0, 0]
        zero = model(inputs_embeds=torch.zeros(1, 8, 6, dtype=torch.float64)).logits[0, 0]
    mask, tid = torch.ones_like(ids), torch.tensor([0])
    rel = integrated_gradients(model, ids, mask, tid, steps=64, batch_size=64)
    assert float(rel.sum()) == pytest.approx(float(full - zero), rel=1e-3)  # completeness
    split = integrated_gradients(model, ids, mask, tid, steps=64, batch_size=5)
    assert torch.allclose(rel, split, atol=1e-6)
    with pytest.raises(InputError, match="steps"):
        integrated_gradients(model, ids, mask, tid, steps=0)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_attention_baselines(family):
    model = build(family)
    before = model.config._attn_implementation
    ids = torch.randint(5, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    tid = torch.tensor([1, 2])
    for fn in (attention_rollout, last_layer_attention):
        rel = fn(model, ids, mask, tid)
        assert rel.shape == (2, 7)
        assert (rel[0, 5:] == 0).all() and (rel >= 0).all()
        assert torch.allclose(rel.sum(-1), torch.ones(2), atol=1e-5)  # rows of a stochastic matrix
    assert model.config._attn_implementation == before
    with pytest.raises(InputError, match="transformers model"):
        attention_rollout(BagOfWords(), ids, mask, tid)


def test_evaluate_on_tiny_models_padding_and_targets():
    llama = build("llama")
    ids = torch.randint(5, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    report = evaluate(llama, {"input_ids": ids, "attention_mask": mask}, ["gradient", "ah-lrp"], steps=4)
    rows = [ids[0, 3:], ids[1]]
    again = evaluate(llama, rows, ["gradient"], steps=4)
    assert torch.allclose(report["gradient"].abpc, again["gradient"].abpc, atol=1e-5)
    assert report["ah-lrp"].conservation.max() < 1e-3  # no biases in llama: AH-LRP conserves
    fixed = evaluate(llama, rows, ["gradient"], target=[3, 4], steps=4)
    assert fixed.targets == [3, 4]
    with pytest.raises(TargetError, match="2 samples"):
        evaluate(llama, rows, ["gradient"], target=[3])
    tok = tiny_tokenizer()
    with pytest.raises(TargetError, match=r"target 'good film' splits into 2 tokens"):
        evaluate(llama, rows, ["gradient"], tokenizer=tok, target="good film", steps=2)
    bert = build("bert")
    bert.config.id2label = {0: "NEG", 1: "NEU", 2: "POS"}
    out = evaluate(bert, ids[1:], ["random"], target="pos", steps=2)
    assert out.targets == [2]


def test_method_errors_and_reproducible_random():
    model = BagOfWords()
    ids = torch.randint(0, 30, (3, 6))
    with pytest.raises(InputError, match="unknown method 'lrp'"):
        evaluate(model, ids, ["lrp"])
    with pytest.raises(InputError, match="duplicate"):
        evaluate(model, ids, ["random", "random"])
    with pytest.raises(InputError, match="relevance values"):
        evaluate(model, ids, {"bad": lambda m, i, a, t: torch.zeros(1, 3)})
    a = evaluate(model, ids, ["random"], seed=5)["random"].abpc
    b = evaluate(model, ids, ["random"], seed=5)["random"].abpc
    assert torch.equal(a, b)


def test_contrast_is_explained_and_scored_and_explain_contrast_only_explained():
    """A 3-class tiny BERT: with ``contrast``, the curve at 0 % is logit(target) − logit(foil) and
    the relevance is that of the difference (for a preset and for a function alike); with
    ``explain_contrast`` the curve is the target's own logit."""
    import lxt_plus

    model = build("bert", num_labels=3).float()
    ids = torch.randint(4, 90, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    targets = logits.argmax(-1)
    runner_up = logits.clone().scatter_(1, targets[:, None], -float("inf")).argmax(-1)
    methods = {"attnlrp": "attnlrp", "gxi": gradient_x_input}
    scored = evaluate(model, ids, methods, contrast="runner-up", steps=2)
    plain = evaluate(model, ids, methods, explain_contrast="runner-up", steps=2)
    for r in range(2):
        t, f = int(targets[r]), int(runner_up[r])
        diff = logits[r, t] - logits[r, f]
        for name in methods:
            assert float(scored[name].morf_logit[r, 0]) == pytest.approx(float(diff), rel=1e-5)
            assert float(plain[name].morf_logit[r, 0]) == pytest.approx(float(logits[r, t]), rel=1e-5)
        want = lxt_plus.explain(model, ids[r], target=t, contrast=f, rules="attnlrp").relevance
        curves = perturbation_curves(model, ids[r], want, t, steps=2, contrast=f)
        assert float(scored["attnlrp"].abpc[r]) == pytest.approx(abpc(curves), rel=1e-5)
        one, mask = ids[r : r + 1], torch.ones(1, 7, dtype=torch.long)
        gxi = gradient_x_input(model, one, mask, torch.tensor([t])) - gradient_x_input(
            model, one, mask, torch.tensor([f])
        )
        curves = perturbation_curves(model, ids[r], gxi[0], t, steps=2, contrast=f)
        assert float(scored["gxi"].abpc[r]) == pytest.approx(abpc(curves), rel=1e-5)
    with pytest.raises(InputError, match="not both"):
        evaluate(model, ids, methods, contrast="runner-up", explain_contrast="runner-up")
    with pytest.raises(TargetError, match="the target itself"):
        evaluate(model, ids[:1], methods, contrast=int(targets[0]))
