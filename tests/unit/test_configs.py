"""The YAML presets in configs/ and the errors of malformed configurations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lxt_plus
from lxt_plus import PRESETS, Preset, get_preset, load_preset
from lxt_plus.engine.rules import AHLRP, Epsilon, Gamma
from lxt_plus.errors import ConfigError, PresetError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from families import build, tiny_vit  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(CONFIGS.glob("*.yaml"))
MIRRORS = {"attnlrp", "cp-lrp", "ah-lrp", "pa-attnlrp", "pa-ah-lrp", "gradient", "conservative-check"}


def test_every_expected_file_exists() -> None:
    names = {f.stem for f in FILES}
    assert MIRRORS | {"vit-gamma", "custom-example"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_config_loads_and_round_trips(path: Path) -> None:
    preset = load_preset(path)
    assert preset.name == path.stem
    assert get_preset(str(path)) == preset  # a path works wherever a preset name does
    assert Preset.from_dict(__import__("yaml").safe_load(preset.to_yaml())) == preset
    if path.stem in MIRRORS:
        assert preset == PRESETS[path.stem]
    if path.stem in ("cp-lrp", "ah-lrp"):  # the definition is stated in the YAML as in Python
        assert preset.description == PRESETS[path.stem].description != ""
        assert "description" in preset.to_dict()


@pytest.fixture(scope="module")
def tiny() -> dict[str, torch.nn.Module]:
    return {family: build(family) for family in ("llama", "gpt2")}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_config_explains_tiny_models(path: Path, tiny: dict[str, torch.nn.Module]) -> None:
    for model in tiny.values():
        exp = lxt_plus.explain(model, torch.tensor([3, 4, 5, 6]), rules=path)
        assert torch.isfinite(exp.relevance).all() and exp.rules == path.stem


def test_conservative_check_yaml_conserves(tiny: dict[str, torch.nn.Module]) -> None:
    exp = lxt_plus.explain(
        tiny["llama"], torch.tensor([3, 4, 5, 6, 7]), rules=CONFIGS / "conservative-check.yaml"
    )
    torch.testing.assert_close(exp.relevance.sum(), exp.target_logit[0], rtol=1e-4, atol=1e-5)


def test_vit_gamma_puts_gamma_on_linear_layers() -> None:
    preset = load_preset(CONFIGS / "vit-gamma.yaml")
    handle = lxt_plus.patch(tiny_vit(), preset)
    try:
        linear = [e.rule for e in handle.plan.entries if e.type_name in ("Linear", "Conv2d")]
        assert len(linear) >= 9 and set(linear) == {Gamma(gamma=0.25)}
    finally:
        handle.remove()


def test_custom_example_overrides_by_name_and_type(tiny: dict[str, torch.nn.Module]) -> None:
    preset = load_preset(CONFIGS / "custom-example.yaml")
    llama, gpt2 = tiny["llama"], tiny["gpt2"]
    with lxt_plus.patched(llama, preset) as handle:
        rules = {e.path: e.rule for e in handle.plan.entries}
        assert rules["model.layers.0.self_attn"] == AHLRP()
        assert rules["model.layers.1.self_attn"] == PRESETS["attnlrp"].rules[0][1]
        assert rules["model.layers.1.mlp.down_proj"] == Epsilon(eps=1e-6)
    with lxt_plus.patched(gpt2, preset) as handle:
        assert {e.rule for e in handle.plan.entries if e.type_name == "Conv1D"} == {
            Gamma(gamma=0.1, eps=1e-9)
        }


# ------------------------------------------------------------------ errors name the key and the fix
def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "name: x\nbase: attnlrp\nzero_bais: true\n",
            r"unknown key 'zero_bais' \(did you mean 'zero_bias'\?\)",
        ),
        (
            "base: attnlrp\nrules:\n  - select: linear\n    rule: epsilonn\n",
            r"unknown rule 'epsilonn' \(did you mean 'epsilon'\?\)",
        ),
        (
            "base: attnlrp\nrules:\n  - select: linear\n    rule: {gamma: {gama: 0.5}}\n",
            r"rule 'gamma' has no parameter 'gama' \(did you mean 'gamma'\?\)",
        ),
        (
            "base: attnlrp\nrules:\n  - select: linaer\n    rule: epsilon\n",
            r"unknown selector 'linaer' \(did you mean 'linear'\?\)",
        ),
        (
            "base: attnlrp\nrules:\n  - selct: linear\n    rule: epsilon\n",
            r"rules\[0\] must be a mapping with keys",
        ),
        ("base: attnlrp\nzero_bias: maybe\n", "zero_bias must be true or false"),
        (
            "base: attnlrp\nrules:\n  - select: linear\n    rule: {epsilon: {eps: lots}}\n",
            "parameter 'eps' of rule 'epsilon' is a number, got 'lots'",
        ),
        ("- just\n- a list\n", "a preset is a mapping"),
        ("name: empty\n", "no rules and no base preset"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_preset(_write(tmp_path, text))


def test_malformed_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preset.yaml: malformed YAML"):
        load_preset(_write(tmp_path, "name: x\nrules: [select: linear\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_preset(tmp_path / "missing.yaml")


def test_unknown_base_preset_suggests(tmp_path: Path) -> None:
    with pytest.raises(PresetError, match=r"unknown preset 'atnlrp' \(did you mean 'attnlrp'\?\)"):
        load_preset(_write(tmp_path, "base: atnlrp\n"))


def test_same_names_in_python_yaml_and_cli(tmp_path: Path) -> None:
    """A rule or preset name means the same thing in a dict, a YAML file and a --rules argument."""
    spec = {
        "name": "mine",
        "base": "cp-lrp",
        "rules": [{"select": "linear", "rule": {"epsilon": {"eps": 0.01}}}],
    }
    from_dict = Preset.from_dict(spec)
    path = _write(tmp_path, from_dict.to_yaml())
    assert load_preset(path) == from_dict == get_preset(str(path))
    assert from_dict.rules[1:] == PRESETS["cp-lrp"].rules
    assert get_preset("cp-lrp") == load_preset(CONFIGS / "cp-lrp.yaml")
    assert get_preset("ah-lrp") == load_preset(CONFIGS / "ah-lrp.yaml") != get_preset("cp-lrp")
    from lxt_plus.cli import build_parser

    args = build_parser().parse_args(["explain", "hi", "--rules", str(path)])
    assert get_preset(args.rules) == from_dict
