"""Presets, selectors and role detection."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import lxt_plus
from lxt_plus.engine.detect import detect_roles
from lxt_plus.engine.plan import PRESETS, Preset, build_plan, get_preset
from lxt_plus.engine.rules import AHLRP, AttnLRP, Epsilon, Gamma, Identity, Pass, rule_from_spec
from lxt_plus.errors import ConfigError, PresetError, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402


def roles(model: torch.nn.Module) -> dict[str, str]:
    return {i.path: i.role for i in detect_roles(model)}


def test_roles_are_recognised_by_structure() -> None:
    r = roles(F.build("llama"))
    assert r["model.layers.0.self_attn"] == "attention"
    assert r["model.layers.0.mlp"] == "mlp"
    assert r["model.layers.0.mlp.act_fn"] == "activation"
    assert r["model.layers.0.input_layernorm"] == "norm"
    assert r["model.rotary_emb"] == "rotary"
    assert r["model.layers.0.mlp.gate_proj"] == "linear"  # a gate *projection* is not a router
    assert r[""] == "head"
    moe = roles(F.build("qwen2_moe"))
    assert moe["model.layers.0.mlp"] == "mlp"
    assert moe["model.layers.0.mlp.experts"] == "container"  # nested in the MoE block: not ruled twice
    assert moe["model.layers.0.mlp.gate"] == "router"
    assert moe["model.layers.0.mlp.shared_expert_gate"] == "router"
    bert = roles(F.build("bert"))
    assert bert["bert.encoder.layer.0.attention.self"] == "attention"
    assert bert["bert.encoder.layer.0.attention"] == "container"
    assert bert["bert.pooler.activation"] == "activation"


def test_presets_and_aliases() -> None:
    assert get_preset("cp-lrp") is PRESETS["cp-lrp"] and get_preset("CPLRP") is PRESETS["cp-lrp"]
    assert get_preset("ahlrp") is PRESETS["ah-lrp"] and PRESETS["cp-lrp"] != PRESETS["ah-lrp"]
    assert lxt_plus.list_presets() == sorted(PRESETS)
    assert get_preset("AttnLRP") is PRESETS["attnlrp"]
    assert get_preset(PRESETS["gradient"]) is PRESETS["gradient"]
    with pytest.raises(PresetError, match=r"unknown preset 'ah_lrp' \(did you mean 'ah-lrp'\?\)"):
        get_preset("ah_lrp")
    assert "attention=attnlrp()" in repr(PRESETS["attnlrp"])
    assert PRESETS["conservative-check"].zero_bias


def test_overrides_win_first_match() -> None:
    model = F.build("llama")
    preset = (
        get_preset("attnlrp")
        .override("linear", Epsilon(eps=1e-6))
        .override("name:model.layers.0.*", Gamma(gamma=0.5))
        .override("type:LlamaAttention", AHLRP())
    )
    plan = build_plan(model, preset)
    by_path = {e.path: e.rule for e in plan.entries}
    assert by_path["model.layers.0.mlp.up_proj"] == Gamma(gamma=0.5)
    assert by_path["model.layers.1.mlp.up_proj"] == Epsilon(eps=1e-6)
    assert by_path["model.layers.1.self_attn"] == AHLRP()
    assert by_path["model.layers.1.mlp.act_fn"] == Identity()
    assert "epsilon(eps=1e-06)" in plan.describe()


def test_overrides_change_relevance() -> None:
    model = F.build("llama")
    ids = torch.randint(3, 90, (6,), generator=torch.Generator().manual_seed(0))
    base = lxt_plus.explain(model, ids, rules="attnlrp").relevance
    eps = lxt_plus.explain(
        model, ids, rules=get_preset("attnlrp").override("linear", Epsilon(eps=0.5))
    ).relevance
    assert not torch.allclose(base, eps)


def test_rule_specs_and_their_errors() -> None:
    assert rule_from_spec("identity") == Identity()
    assert rule_from_spec({"epsilon": {"eps": 1e-3}}) == Epsilon(eps=1e-3)
    assert rule_from_spec({"name": "gamma", "gamma": 0.1}) == Gamma(gamma=0.1)
    assert rule_from_spec("cp-lrp") == AHLRP() and rule_from_spec("attnlrp") == AttnLRP()
    assert rule_from_spec("gradient") == Pass()
    with pytest.raises(ConfigError, match=r"unknown rule 'epsilom' \(did you mean 'epsilon'\?\)"):
        rule_from_spec("epsilom")
    with pytest.raises(ConfigError, match=r"rule 'gamma' has no parameter 'gama' \(did you mean 'gamma'\?\)"):
        rule_from_spec({"gamma": {"gama": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown selector 'norms' \(did you mean 'norm'\?\)"):
        get_preset("attnlrp").override("norms", "identity")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"epsilon": {"eps": -1e-3}}, r"rule 'epsilon': eps must be >= 0, got -0.001"),
        ({"gamma": {"gamma": -0.25}}, r"rule 'gamma': gamma must be >= 0, got -0.25"),
        ({"gamma": {"gamma": float("nan")}}, r"rule 'gamma': gamma must be a finite number, got nan"),
        ({"identity": {"eps": float("inf")}}, r"rule 'identity': eps must be a finite number, got inf"),
    ],
)
def test_a_negative_or_infinite_stabiliser_or_gamma_is_refused(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        rule_from_spec(spec)
    ((name, params),) = spec.items()
    with pytest.raises(ConfigError, match=message):  # in Python too
        type(rule_from_spec(name))(**params)
    assert rule_from_spec({"epsilon": {"eps": 0}}) == Epsilon(eps=0.0)  # zero is LRP-0


def test_a_name_selector_that_matches_no_module_warns_and_an_attention_rule_on_linears_is_refused() -> None:
    model = F.build("llama")
    ids = torch.tensor([[3, 5, 7, 9]])
    typo = get_preset("attnlrp").override("name:model.layer.0.*", {"epsilon": {"eps": 0.1}})
    with pytest.warns(
        lxt_plus.errors.LxtPlusWarning, match=r"selector 'name:model.layer.0.\*' matches no module"
    ):
        lxt_plus.explain(model, ids, rules=typo)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lxt_plus.errors.LxtPlusWarning)  # one that matches: no warning
        lxt_plus.explain(
            model, ids, rules=get_preset("attnlrp").override("name:model.layers.0.*_proj", "epsilon")
        )
    misplaced = get_preset("attnlrp").override("linear", "attnlrp")
    with pytest.raises(
        UnsupportedModelError, match=r"rule 'attnlrp' is an attention rule, and these modules"
    ):
        lxt_plus.explain(model, ids, rules=misplaced)


def test_preset_yaml_round_trip(tmp_path: Path) -> None:
    preset = get_preset("attnlrp").override("name:*.layers.0.*", {"gamma": {"gamma": 0.25}}, name="mine")
    path = tmp_path / "mine.yaml"
    preset.save(path)
    loaded = lxt_plus.load_preset(path)
    assert loaded == preset
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrulez: []\n")
    with pytest.raises(ConfigError, match=r"unknown key 'rulez' \(did you mean 'rules'\?\)"):
        lxt_plus.load_preset(bad)
    bad.write_text("rules: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        lxt_plus.load_preset(bad)
    assert Preset.from_dict({"base": "ah-lrp", "rules": {"linear": "identity"}}).rules[0] == (
        "linear",
        Identity(),
    )
