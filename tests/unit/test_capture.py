"""Latent relevance (layers, heads, neurons) on tiny random models, float64, seeded."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import lxt_plus
from lxt_plus.api import capture as cap
from lxt_plus.errors import InputError, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import families  # noqa: E402

ALL = ("layers", "heads", "neurons")


def _inputs(seed: int = 1, rows: int = 2, seq: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0  # right padding in the last row exercises the masked path
    return ids, mask


def _model(family: str, **overrides) -> torch.nn.Module:
    return families.build(family, **overrides).double()


def _rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * float(b.abs().max())), (a, b)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return _model("llama")


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return _model("bert")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_shapes_and_layer_conservation(family: str, llama, bert) -> None:
    model = {"llama": llama, "bert": bert}[family]
    ids, mask = _inputs()
    exp = lxt_plus.explain(model, ids, attention_mask=mask, rules="conservative-check", capture=ALL)
    c = exp.captures
    assert c["layers"].shape == (2, 3, 7)
    assert c["heads"].shape == (2, 2, 4) and c["heads_per_token"].shape == (2, 2, 4, 7)
    assert c["neurons"].shape == (2, 2, 64)
    assert sorted(c["head_patterns"]) == [0, 1] and c["head_patterns"][1].shape == (2, 4, 7, 7)
    # every layer of the residual stream carries the whole target logit
    for layer in range(3):
        _rel_close(c["layers"][:, layer].sum(-1), exp.target_logit)
    # layer 0 is what the embeddings receive (token + position / type embeddings)
    extra = exp.extra_relevance if exp.extra_relevance is not None else 0.0
    _rel_close(exp.batch_relevance.sum(-1) + extra, c["layers"][:, 0].sum(-1))
    assert float(c["layers"][1, :, -2:].abs().max()) < 1e-12  # padding carries nothing
    _rel_close(c["heads_per_token"].sum(-1), c["heads"], rtol=1e-10)


def _frozen_final_norm(model: torch.nn.Module):
    """Hooks that hold the final RMSNorm's scale at its unperturbed value, so the logit is linear in
    the last layer's output (as under the conservative norm rule)."""
    norm = model.model.norm
    saved: dict[str, torch.Tensor] = {}

    def hook(module, args, out):
        x = args[0]
        if "scale" not in saved:
            saved["scale"] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return x * saved["scale"] * module.weight

    return norm.register_forward_hook(hook)


def _logit_with(model, ids, module, zero: slice, target: int) -> float:
    """Plain forward with the frozen final norm and ``module``'s input features ``zero`` set to 0."""

    def pre(mod, args):
        x = args[0].clone()
        x[..., zero] = 0.0
        return (x,)

    handles = [_frozen_final_norm(model)]
    with torch.no_grad():
        base = float(model(input_ids=ids).logits[0, -1, target])  # fixes the norm scale
        handles.append(module.register_forward_pre_hook(pre))
        changed = float(model(input_ids=ids).logits[0, -1, target])
    for h in handles:
        h.remove()
    return base - changed


def test_head_relevance_is_exact_in_last_layer(llama) -> None:
    model = copy.deepcopy(llama)
    last = model.model.layers[-1]
    with torch.no_grad():
        last.mlp.down_proj.weight.zero_()  # the logit is then linear in the last attention's output
    ids = _inputs(rows=1)[0]
    exp = lxt_plus.explain(model, ids, rules="conservative-check", capture="heads")
    target = exp.targets[0].ids[0]
    heads = exp.captures["heads"][0, -1]
    assert float(heads.abs().max()) > 1e-3
    d = model.config.head_dim
    for h in range(4):
        change = _logit_with(model, ids, last.self_attn.o_proj, slice(h * d, (h + 1) * d), target)
        _rel_close(torch.tensor(change), heads[h])


def test_neuron_relevance_is_exact_in_last_layer(llama) -> None:
    model = copy.deepcopy(llama)
    ids = _inputs(rows=1)[0]
    exp = lxt_plus.explain(model, ids, rules="conservative-check", capture="neurons")
    target = exp.targets[0].ids[0]
    neurons = exp.captures["neurons"][0, -1]
    down = model.model.layers[-1].mlp.down_proj
    for n in torch.argsort(neurons.abs(), descending=True)[:3].tolist():
        _rel_close(torch.tensor(_logit_with(model, ids, down, slice(n, n + 1), target)), neurons[n])
    _rel_close(torch.tensor(_logit_with(model, ids, down, slice(None), target)), neurons.sum())


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_neurons_sum_to_mlp_relevance(family: str, llama, bert) -> None:
    """Independent check: a manual patched forward/backward with retained MLP outputs."""
    model = {"llama": llama, "bert": bert}[family]
    ids, mask = _inputs()
    exp = lxt_plus.explain(model, ids, attention_mask=mask, rules="conservative-check", capture="neurons")
    _, parts = cap.find_blocks(model)
    outs: list[torch.Tensor] = []
    hooks = [p.down_proj.register_forward_hook(lambda m, a, o: outs.append(o)) for p in parts]
    with lxt_plus.patched(model, "conservative-check"), torch.enable_grad():
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, attention_mask=mask).logits
        value = sum(
            out[r, t.position, t.ids[0]] if family == "llama" else out[r, t.ids[0]]
            for r, t in enumerate(exp.targets)
        )
        grads = torch.autograd.grad(value, outs)
    for h in hooks:
        h.remove()
    through_mlp = torch.stack([(o * g).sum((-1, -2)) for o, g in zip(outs, grads, strict=True)], 1)
    _rel_close(exp.captures["neurons"].sum(-1), through_mlp.detach())


@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
@pytest.mark.parametrize(
    "family,attn", [("llama", "sdpa"), ("llama", "eager"), ("bert", "sdpa"), ("bert", "eager")]
)
def test_pattern_rows_sum_to_head_relevance(family: str, attn: str, rules: str) -> None:
    model = _model(family, attn_implementation=attn)
    ids, mask = _inputs()
    c = lxt_plus.explain(model, ids, attention_mask=mask, rules=rules, capture="heads").captures
    for layer, pattern in c["head_patterns"].items():
        _rel_close(pattern.sum(-1), c["heads_per_token"][:, layer], rtol=1e-9)
        if family == "llama":  # causal: no relevance from future keys
            assert float(pattern.triu(1).abs().max()) == 0.0


def test_patterns_kept_only_where_asked(llama, monkeypatch) -> None:
    ids = _inputs(rows=1)[0]
    with cap.keep_patterns([-1]):
        c = lxt_plus.explain(llama, ids, capture="heads").captures
    assert sorted(c["head_patterns"]) == [1]
    monkeypatch.setattr(cap, "PATTERN_MAX_SEQ", 4)
    assert lxt_plus.explain(llama, ids, capture="heads").captures["head_patterns"] == {}
    with cap.keep_patterns("all"):
        assert sorted(lxt_plus.explain(llama, ids, capture="heads").captures["head_patterns"]) == [0, 1]
    with pytest.raises(InputError, match="layer indices or 'all'"):
        with cap.keep_patterns("some"):
            pass


def test_helpers_and_batch_rows(llama) -> None:
    ids, mask = _inputs()
    exp = lxt_plus.explain(llama, ids, attention_mask=mask, capture=ALL)
    top = cap.top_neurons(exp, k=5)
    assert len(top) == 5 and all(0 <= layer < 2 and 0 <= n < 64 for layer, n, _ in top)
    assert [r for *_, r in top] == sorted((r for *_, r in top), reverse=True)
    assert top[0][2] == pytest.approx(float(exp.captures["neurons"][0].max()))
    assert cap.top_neurons(exp, k=1, by="negative")[0][2] == pytest.approx(
        float(exp.captures["neurons"][0].min())
    )
    parts = cap.layer_contributions(exp, row=1)
    assert parts["attention"].shape == parts["mlp"].shape == (2,)
    row = exp[1]
    assert torch.equal(row.captures["layers"][0], exp.captures["layers"][1])
    assert torch.equal(row.captures["head_patterns"][0][0], exp.captures["head_patterns"][0][1])
    with pytest.raises(InputError, match="by must be"):
        cap.top_neurons(exp, by="largest")


def test_other_families_and_errors() -> None:
    for family in ("gpt2", "phi"):
        c = lxt_plus.explain(_model(family), _inputs(rows=1)[0], rules="conservative-check", capture=ALL)
        _rel_close(c.captures["layers"][0].sum(-1), c.target_logit.expand(3))
    vit = families.tiny_vit().double()
    exp = lxt_plus.explain(
        vit, torch.randn(1, 1, 8, 8, dtype=torch.float64), rules="conservative-check", capture=ALL
    )
    assert exp.captures["layers"].shape == (1, 3, 17)
    _rel_close(exp.captures["layers"][0].sum(-1), exp.target_logit.expand(3))
    with pytest.raises(UnsupportedModelError, match="no dense MLP"):
        lxt_plus.explain(families.build("mixtral"), _inputs(rows=1)[0], capture="neurons")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="no list of transformer blocks"):
        lxt_plus.explain(mlp, torch.randn(4), capture="layers")
    with pytest.raises(InputError, match="explain with capture"):
        cap.top_neurons(lxt_plus.explain(mlp, torch.randn(4)))


def test_plots(llama) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from lxt_plus.render import latent

    exp = lxt_plus.explain(llama, _inputs(rows=1)[0], capture=ALL)
    for fig in (
        latent.plot_layers(exp),
        latent.plot_heads(exp),
        latent.plot_head_pattern(exp, -1, 0),
        latent.plot_neurons(exp, k=5),
    ):
        assert isinstance(fig, Figure) and fig.axes
    with pytest.raises(InputError, match="no patterns"):
        latent.plot_head_pattern(lxt_plus.explain(llama, _inputs(rows=1)[0], capture="layers"), 0, 0)


def test_captures_are_typed_and_read_as_a_dict(llama) -> None:
    from lxt_plus.results.captures import Captures
    from lxt_plus.results.result import explanation_from_dict

    ids = _inputs(rows=1)[0]
    exp = lxt_plus.explain(llama, ids, capture=("layers", "heads"))
    c = exp.captures
    assert isinstance(c, Captures)
    assert c.layers is c["layers"] and c.neurons is None and "neurons" not in c
    assert list(c) == ["layers", "heads", "heads_per_token", "head_patterns"]
    with pytest.raises(KeyError):
        c["neurons"]
    assert sorted(dict(c)) == sorted(c.keys())
    c["note"] = "kept"
    assert c.other == {"note": "kept"} and c["note"] == "kept"
    back = explanation_from_dict(exp.to_dict()).captures  # JSON keys are strings: layers come back as ints
    assert isinstance(back, Captures) and sorted(back.head_patterns) == sorted(c.head_patterns)
    torch.testing.assert_close(back.layers, c.layers)
    assert back["note"] == "kept"
    del c["note"]
    assert "note" not in c and "Captures(layers=tensor(" in repr(c)
