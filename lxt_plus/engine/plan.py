"""Presets and plans: which rule goes to which module.

A :class:`Preset` is an ordered first-match list of ``(selector, rule)``. Selectors are a role
(``"norm"``, ``"attention"``, ...; see :data:`lxt_plus.engine.detect.ROLES`), ``"type:ClassName"``, or
``"name:<glob>"`` on the module path. The same names work in Python, YAML and the CLI.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from lxt_plus.engine.detect import ROLES, ModuleInfo, detect_roles
from lxt_plus.engine.names import PRESET_NAMES
from lxt_plus.engine.opcheck import OpReport
from lxt_plus.engine.rules import (
    AHLRP,
    PAAHLRP,
    AttnLRP,
    Conservative,
    Constant,
    ConstantGate,
    DropoutOff,
    Epsilon,
    HeadIdentity,
    Identity,
    PAAttnLRP,
    Pass,
    RouterLRP,
    Rule,
    SelectiveScan,
    UniformProduct,
    rule_from_spec,
)
from lxt_plus.errors import ConfigError, LxtPlusWarning, PresetError, UnsupportedModelError, nearest

__all__ = [
    "Preset",
    "Plan",
    "PlanEntry",
    "PRESETS",
    "get_preset",
    "list_presets",
    "load_preset",
    "build_plan",
]


def _check_selector(sel: str) -> str:
    if sel in ROLES or sel == "any":
        return sel
    kind, _, value = sel.partition(":")
    if kind in ("type", "name") and value:
        return sel
    raise ConfigError(
        f"unknown selector {sel!r}{nearest(sel, ROLES)}; a selector is a role ({', '.join(ROLES)}), "
        "'any', 'type:ClassName' or 'name:<glob on the module path>'"
    )


def selector_matches(sel: str, info: ModuleInfo) -> bool:
    if sel == "any":
        return True
    if sel in ROLES:
        return info.role == sel
    kind, _, value = sel.partition(":")
    if kind == "type":
        return any(cls.__name__ == value for cls in type(info.module).__mro__)
    return info.role not in ("container",) and fnmatch.fnmatchcase(info.path, value)


@dataclass(frozen=True)
class Preset:
    """A named, inspectable rule plan: ``(selector, rule)`` pairs, first match wins.

    ``zero_bias`` zeroes every bias while patched (restored exactly on remove): with ``ah-lrp``
    this makes relevance conservative, which is how :func:`lxt_plus.audit` checks a plan.
    ``description`` says in words what the preset holds constant and how products split (the
    built-in presets cite their definitions); it does not take part in comparisons.
    """

    name: str
    rules: tuple[tuple[str, Rule], ...]
    zero_bias: bool = False
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for sel, _ in self.rules:
            _check_selector(sel)

    def override(
        self, selector: str, rule: Rule | str | Mapping[str, Any], name: str | None = None
    ) -> Preset:
        """A copy where ``selector`` gets ``rule`` ahead of every other entry."""
        entry = (_check_selector(selector), rule_from_spec(rule, f"override {selector!r}"))
        note = f"{selector} -> {entry[1]!r}"
        description = f"{self.description}; overridden: {note}" if self.description else f"overridden: {note}"
        return replace(
            self, rules=(entry,) + self.rules, name=name or f"{self.name}+", description=description
        )

    def rule_for(self, info: ModuleInfo) -> Rule | None:
        for sel, rule in self.rules:
            if selector_matches(sel, info):
                return rule
        return None

    @property
    def positional(self) -> bool:
        """Whether relevance is read on position-token pairs (PA-LRP): an attention rule of this
        preset makes the positions inputs, and ``relevance`` then holds token plus position."""
        return any(getattr(rule, "positional", False) for _, rule in self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **({"description": self.description} if self.description else {}),
            "zero_bias": self.zero_bias,
            "rules": [
                {"select": sel, "rule": {rule.name: rule.params()} if rule.params() else rule.name}
                for sel, rule in self.rules
            ],
        }

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "preset") -> Preset:
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where}: a preset is a mapping with keys name, base, zero_bias, rules; "
                f"got {type(data).__name__}"
            )
        valid = {"name", "base", "zero_bias", "rules", "description"}
        for key in data:
            if key not in valid:
                raise ConfigError(
                    f"{where}: unknown key {key!r}{nearest(str(key), valid)}; "
                    f"valid keys: {', '.join(sorted(valid))}"
                )
        base = get_preset(data["base"]) if data.get("base") else None
        raw = data.get("rules", [])
        entries: list[tuple[str, Rule]] = []
        items: list[tuple[Any, Any]]
        if isinstance(raw, Mapping):
            items = list(raw.items())
        elif isinstance(raw, list):
            items = []
            for i, item in enumerate(raw):
                if not isinstance(item, Mapping) or set(item) != {"select", "rule"}:
                    raise ConfigError(
                        f"{where}: rules[{i}] must be a mapping with keys 'select' and 'rule', got {item!r}"
                    )
                items.append((item["select"], item["rule"]))
        else:
            raise ConfigError(f"{where}: 'rules' must be a list or a mapping, got {type(raw).__name__}")
        for sel, spec in items:
            entries.append((_check_selector(str(sel)), rule_from_spec(spec, f"{where}: rule for {sel!r}")))
        rules = tuple(entries) + (base.rules if base else ())
        if not rules:
            raise ConfigError(f"{where}: no rules and no base preset")
        zero_bias = data.get("zero_bias", base.zero_bias if base else False)
        if not isinstance(zero_bias, bool):
            raise ConfigError(f"{where}: zero_bias must be true or false, got {zero_bias!r}")
        return cls(
            name=str(data.get("name", base.name if base else "custom")),
            rules=rules,
            zero_bias=zero_bias,
            description=str(data.get("description", "")),
        )

    def __repr__(self) -> str:
        body = ", ".join(f"{sel}={rule!r}" for sel, rule in self.rules)
        zb = ", zero_bias=True" if self.zero_bias else ""
        return f"Preset({self.name!r}: {body}{zb})"


_REST: tuple[tuple[str, Rule], ...] = (
    ("head", HeadIdentity()),
    ("linear", Epsilon()),
    ("conv", Epsilon()),
    ("dropout", DropoutOff()),
    ("embedding", Pass()),
    ("softmax", Pass()),
    ("rotary", Pass()),
    ("structural", Pass()),
    ("container", Pass()),
)


def _lrp(attention: Rule, router: Rule, products: Rule) -> tuple[tuple[str, Rule], ...]:
    """The rules every LRP preset shares, with its own attention, router and gated-product rules."""
    return (
        ("attention", attention),
        ("router", router),
        ("ssm", SelectiveScan()),
        ("scan_parameter", Constant()),
        ("activation", Identity()),
        ("norm", Conservative()),
        ("mlp", products),
    ) + _REST


_AH = "attention weights and MoE router weights are constants, relevance flows through the values"
PRESETS: dict[str, Preset] = {
    "attnlrp": Preset(
        "attnlrp",
        _lrp(AttnLRP(), RouterLRP(), UniformProduct()),
        description="AttnLRP (Achtibat et al. 2024): the softmax rule, and the uniform rule (half to each "
        "factor) on q·kᵀ, on A·v, on gated products act(g)·u and on router weight × expert output; "
        "a router's softmax gets the softmax rule and its top-k renormalisation holds the sum constant",
    ),
    "cp-lrp": Preset(
        "cp-lrp",
        _lrp(AHLRP(), Constant(), ConstantGate()),
        description="CP-LRP as LXT defines it (cp_wrap_attention_forward, cp_gated_mlp_forward): "
        f"{_AH}, and the gate act(gate_proj(x)) of a gated MLP is a constant too, so all of its "
        "relevance flows through up_proj",
    ),
    "ah-lrp": Preset(
        "ah-lrp",
        _lrp(AHLRP(), Constant(), UniformProduct()),
        description=f"AH-LRP (Ali et al. 2022): {_AH}; a gated MLP's product act(g)·u splits its relevance "
        "half and half (uniform rule); cp-lrp holds the gate constant instead",
    ),
    "pa-attnlrp": Preset(
        "pa-attnlrp",
        _lrp(PAAttnLRP(), RouterLRP(), UniformProduct()),
        description="attnlrp with positional relevance (PA-LRP, Bakish et al. 2025): the input is read "
        "as position-token pairs. Rotary cos and sin are inputs, each product q·cos, rotate_half(q)·sin "
        "(and for k) gives half its relevance to the position; added position tables take their "
        "share by the epsilon rule on the sum. relevance is token plus position, per position",
    ),
    "pa-ah-lrp": Preset(
        "pa-ah-lrp",
        _lrp(PAAHLRP(), Constant(), UniformProduct()),
        description="ah-lrp with positional relevance (PA-LRP, Bakish et al. 2025): relevance is token "
        "plus position, per position. Added position tables take their share by the epsilon rule; "
        "rotary angles act only through the attention weights, which are constants here, so they "
        "take none",
    ),
    "gradient": Preset(
        "gradient", (("dropout", DropoutOff()), ("any", Pass())), description="plain Gradient×Input"
    ),
    "conservative-check": Preset(
        "conservative-check",
        _lrp(AHLRP(), Constant(), UniformProduct()),
        zero_bias=True,
        description="ah-lrp with every bias zeroed while patched: relevance then sums to the target logit, "
        "which is how audit proves a plan complete",
    ),
}
if tuple(PRESETS) != PRESET_NAMES:  # pragma: no cover - a preset added here but not in names.py
    raise ImportError(
        f"lxt_plus.engine.names.PRESET_NAMES {PRESET_NAMES} differs from PRESETS {tuple(PRESETS)}"
    )
_ALIASES = {
    "ahlrp": "ah-lrp",
    "cplrp": "cp-lrp",
    "attn-lrp": "attnlrp",
    "gxi": "gradient",
    "gradient-x-input": "gradient",
}


def list_presets() -> list[str]:
    """Every preset name (aliases not included) that ``rules=`` and ``--rules`` accept."""
    return sorted(PRESETS)


def get_preset(rules: str | Preset | Mapping[str, Any] | Path) -> Preset:
    """A preset from a name (``"attnlrp"``, ``"cp-lrp"``, ``"ah-lrp"``, ``"gradient"``,
    ``"conservative-check"``; see :func:`list_presets`), a YAML file path, a mapping, or a
    :class:`Preset`."""
    if isinstance(rules, Preset):
        return rules
    if isinstance(rules, Mapping):
        return Preset.from_dict(rules)
    text = str(rules)
    if isinstance(rules, Path) or text.endswith((".yaml", ".yml")):
        return load_preset(text)
    key = _ALIASES.get(text.lower(), text.lower())
    if key not in PRESETS:
        hint = nearest(text.lower(), sorted(PRESETS)) or nearest(text.lower(), sorted(_ALIASES))
        raise PresetError(
            f"unknown preset {text!r}{hint}; valid presets: "
            f"{', '.join(sorted(PRESETS))} (aliases: {', '.join(sorted(_ALIASES))}), "
            "or a path to a .yaml file"
        )
    return PRESETS[key]


def load_preset(path: str | Path) -> Preset:
    """Load and validate a YAML preset file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"preset file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise ConfigError(f"{p.name}: malformed YAML: {first}") from None
    return Preset.from_dict(data if data is not None else {}, where=p.name)


@dataclass
class PlanEntry:
    """One module of the plan: where it is, what it was recognised as, and its rule."""

    path: str
    type_name: str
    role: str
    rule: Rule
    route: str = "forward"  # forward | registry | ops | none


@dataclass
class Plan:
    preset: Preset
    entries: list[PlanEntry] = field(default_factory=list)
    infos: list[ModuleInfo] = field(default_factory=list)
    # what the patch-time probe found at the level of operations (None: not probed)
    operations: OpReport | None = None
    # attention modules whose output gate the probe found, ruled by rules.gate_products
    gated: frozenset[str] = frozenset()

    def describe(self, show_pass: bool = False) -> str:
        """``module path -> rule`` for every module the plan touches."""
        lines = [
            f"lxt_plus plan: preset {self.preset.name!r}"
            + (" (biases zeroed)" if self.preset.zero_bias else "")
        ]
        if self.preset.description:
            lines.append(f"  {self.preset.description}")
        rows = [e for e in self.entries if show_pass or (e.route != "none")]
        width = max((len(e.path or "<model>") for e in rows), default=10)
        for e in rows:
            where = e.path or "<model>"
            via = {"registry": " [attention registry]", "ops": " [inline attention ops]"}.get(e.route, "")
            lines.append(f"  {where:<{width}}  {e.type_name:<28} {e.role:<10} -> {e.rule!r}{via}")
        if not rows:
            lines.append("  (no module is changed: plain Gradient×Input)")
        if self.operations is not None:
            lines.append(f"  {self.operations.summary()}")
        return "\n".join(lines)


def _warn_unmatched(model: nn.Module, preset: Preset, infos: list[ModuleInfo]) -> None:
    """A ``name:`` or ``type:`` selector that matches no module of ``model`` is most likely a typo
    or a preset tuned on another model: its rule is applied nowhere, which the user should know."""
    for sel in dict.fromkeys(s for s, _ in preset.rules if s.startswith(("name:", "type:"))):
        if not any(selector_matches(sel, info) for info in infos):
            warnings.warn(
                f"preset {preset.name!r}: selector {sel!r} matches no module of {type(model).__name__}, so "
                "its rule is applied nowhere; check the name against lxt_plus.patch(model, ...).plan",
                LxtPlusWarning,
                stacklevel=4,
            )


def build_plan(model: nn.Module, preset: Preset, strict: bool = True, op_checked: bool = False) -> Plan:
    """Resolve ``preset`` on ``model``. Raises :class:`UnsupportedModelError` (before anything is
    touched) listing the modules no rule accounts for, unless ``strict=False``.

    ``op_checked``: the patch-time probe will check every operation on the relevance path
    (:mod:`lxt_plus.engine.opcheck`). A module of unknown role then needs no rule of its own: it
    passes, and the probe refuses it only if it computes something that is not linear.
    """
    infos = detect_roles(model)
    plan = Plan(preset=preset, infos=infos)
    missing: list[ModuleInfo] = []
    for info in infos:
        rule = preset.rule_for(info)
        if rule is None:
            if info.role == "container":
                continue
            if op_checked and info.role == "unknown":
                info.note = "no rule: its operations are checked at patch time"
                plan.entries.append(PlanEntry(info.path, info.type_name, info.role, Pass(), "none"))
                continue
            if strict:
                missing.append(info)
                continue
            rule = Pass()
            info.note = "passed through (strict=False)"
        if rule.is_noop() and info.role == "container":
            continue
        route = "none" if rule.is_noop() else "forward"
        plan.entries.append(PlanEntry(info.path, info.type_name, info.role, rule, route))
    _warn_unmatched(model, preset, infos)
    if missing:
        listing = "; ".join(f"{m.path or '<model>'} ({m.type_name}, role {m.role})" for m in missing[:12])
        more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
        raise UnsupportedModelError(
            f"preset {preset.name!r} has no rule for {len(missing)} module(s) of {type(model).__name__}: "
            f"{listing}{more}. Add a rule for them (preset.override('type:ClassName', rule)) or pass "
            "strict=False to let them pass with plain gradients."
        )
    return plan
