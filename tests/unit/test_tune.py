"""Automatic rule tuning on a tiny random Llama."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lxt_plus import get_preset, load_preset
from lxt_plus.engine.plan import build_plan
from lxt_plus.engine.rules import AHLRP, AttnLRP, Epsilon, Gamma
from lxt_plus.evaluation.evaluate import evaluate
from lxt_plus.evaluation.tune import Candidate, _Space, layer_groups, tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build  # noqa: E402


def _ids(seed: int, rows: int = 3) -> torch.Tensor:
    return torch.randint(1, 96, (rows, 8), generator=torch.Generator().manual_seed(seed))


def test_tune_is_never_worse_than_default_and_saves_a_loadable_preset(tmp_path):
    model = build("llama", num_hidden_layers=3)
    result = tune(model, _ids(0), held_out=_ids(1, 2), budget_trials=6, progress=False, steps=4)
    assert 1 <= len(result.trials) <= 6
    assert result.trials[0].preset == get_preset("attnlrp")  # the default is evaluated first
    assert result.default_score == pytest.approx(result.trials[0].score)
    assert result.score >= result.default_score
    assert result.score == max(t.score for t in result.trials)
    assert result.held_out_score is not None and result.default_held_out_score is not None
    text = result.report()
    assert "held-out ABPC" in text and "(default)" in text
    data = yaml.safe_load(result.to_yaml())
    assert isinstance(data, dict) and data["rules"]
    path = tmp_path / "tuned.yaml"
    result.save(str(path))
    loaded = load_preset(path)
    assert loaded == result.preset
    again = evaluate(model, _ids(0), {"tuned": loaded}, steps=4)
    assert float(again["tuned"].abpc.mean()) == pytest.approx(result.score, abs=1e-5)


def test_time_budget_still_evaluates_the_default():
    model = build("llama", num_hidden_layers=3)
    result = tune(model, _ids(0, 2), budget_seconds=0.0, progress=False, steps=2)
    assert len(result.trials) == 1
    assert result.preset is result.default
    assert "no candidate beat" in result.report()


def test_layer_groups_and_candidate_presets_select_the_right_modules():
    model = build("llama", num_hidden_layers=6)
    assert layer_groups(model) == [("embedding-side", [0, 1]), ("middle", [2, 3]), ("head-side", [4, 5])]
    space = _Space(model, get_preset("attnlrp"), (0.0, 1e-3), (0.0, 0.25), mixed=True, attention=("ah-lrp",))
    cand = Candidate(("ah-lrp", "attnlrp", "attnlrp"), (1e-3,) * 3, (0.0, 0.25, 0.0))
    plan = build_plan(model, space.preset(cand))
    rules = {e.path: e.rule for e in plan.entries}
    for path, rule in rules.items():
        layer = int(path.split(".")[2]) if path.startswith("model.layers.") else None
        if path.endswith("_proj"):
            expected = Gamma(0.25, eps=1e-3) if layer in (2, 3) else Epsilon(1e-3)
            assert rule == expected, path
        elif path.endswith("self_attn"):
            assert rule == (AHLRP() if layer in (0, 1) else AttnLRP()), path
    assert rules["lm_head"] == Epsilon(1e-3)
    assert space.preset(space.start) is space.base


def test_epsilon_per_layer_group():
    """ε may differ per group: the most common value goes to every linear layer (the head too), a
    group with another value gets its own, and a γ group keeps its group's ε inside the γ-rule."""
    model = build("llama", num_hidden_layers=6)
    space = _Space(model, get_preset("attnlrp"), (0.0, 1e-3, 0.1), (0.0, 0.25), mixed=True, attention=())
    cand = Candidate(("attnlrp",) * 3, (1e-3, 0.0, 1e-3), (0.0, 0.0, 0.25))
    assert cand.describe(space.names) == (
        "attention=attnlrp eps=embedding-side:0.001,middle:0,head-side:0.001 gamma=head-side:0.25"
    )
    rules = {e.path: e.rule for e in build_plan(model, space.preset(cand)).entries}
    for path, rule in rules.items():
        if path.startswith("model.layers.") and path.endswith("_proj"):
            layer = int(path.split(".")[2])
            expected = {0: Epsilon(1e-3), 1: Epsilon(1e-3), 2: Epsilon(0.0), 3: Epsilon(0.0)}.get(
                layer, Gamma(0.25, eps=1e-3)
            )
            assert rule == expected, path
    assert rules["lm_head"] == Epsilon(1e-3)
    sweeps = list(space.sweeps(space.start))
    per_group = [c for sweep in sweeps for c in sweep if len(set(c.eps)) > 1]
    assert len(per_group) == 3 * 2  # each group to each other value
    assert all(sum(e != 0.0 for e in c.eps) == 1 for c in per_group)


def test_selectors_on_an_encoder():
    model = build("bert", num_hidden_layers=3)
    space = _Space(model, get_preset("ah-lrp"), (0.0,), (0.0, 0.1), mixed=True, attention=("attnlrp",))
    assert space.start.attention == ("ah-lrp",) * 3
    cand = Candidate(("ah-lrp", "ah-lrp", "attnlrp"), (0.0,) * 3, (0.1, 0.0, 0.0))
    rules = {e.path: e.rule for e in build_plan(model, space.preset(cand)).entries}
    gamma = {p for p, r in rules.items() if isinstance(r, Gamma)}
    assert gamma == {
        p
        for p, r in rules.items()
        if p.startswith("bert.encoder.layer.0.") and isinstance(r, Gamma | Epsilon)
    }
    assert len(gamma) == 6  # query, key, value, attention output, intermediate, output
    assert rules["bert.encoder.layer.2.attention.self"] == AttnLRP()
    assert rules["bert.encoder.layer.1.attention.self"] == AHLRP()


def test_cross_validated_selection_is_judged_on_samples_it_did_not_see():
    """``lucky`` owes its best mean (0.67 against 0.1) to one sample. Leave-one-out: without that
    sample the selection is ``steady`` (+0.1 there); with it, ``lucky``, which then loses 1 on the
    held-out sample. The cross-validated gain is negative although the in-sample gain is +0.67."""
    from lxt_plus.evaluation.tune import Candidate, cross_validated_gain

    base, lucky, steady = (Candidate((a,), (0.0,), (0.0,)) for a in ("attnlrp", "ah-lrp", "pa-attnlrp"))
    per_row = {
        base: torch.zeros(6, dtype=torch.float64),
        lucky: torch.tensor([9.0, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64),
        steady: torch.full((6,), 0.1, dtype=torch.float64),
    }
    gains = cross_validated_gain(per_row, base, folds=6)
    torch.testing.assert_close(gains, torch.tensor([0.1, -1.0, -1.0, -1.0, -1.0, -1.0], dtype=torch.float64))
    gains = cross_validated_gain(per_row, base, folds=3, seed=1)
    assert gains.shape == (6,) and set(gains.tolist()) <= {9.0, -1.0, 0.1}


def test_tune_reports_cross_validated_and_paired_held_out_gains():
    model = build("llama", num_hidden_layers=3)
    result = tune(model, _ids(0, 4), held_out=_ids(1, 3), budget_trials=4, progress=False, steps=2, folds=2)
    assert result.cv_gain is not None and result.cv_interval is not None
    lo, hi = result.cv_interval
    assert lo <= result.cv_gain <= hi
    assert result.held_out_interval is not None
    text = result.report()
    assert "cross-validated gain" in text and "held-out gain, paired" in text
    assert all(t.rows is not None and t.rows.shape == (4,) for t in result.trials if t.error is None)
    assert any("pa-" in t.description for t in result.trials) or len(result.trials) < 4


def test_tune_tries_contrastive_heatmaps_when_asked():
    model = build("llama", num_hidden_layers=3)
    result = tune(
        model, _ids(0, 3), budget_trials=6, progress=False, steps=2, contrast=True, folds=0, epsilons=(0.0,)
    )
    described = [t.description for t in result.trials]
    assert any(d.startswith("contrast=runner-up") for d in described), described
    assert (result.explain_contrast == "runner-up") == result.description.startswith("contrast=runner-up")
