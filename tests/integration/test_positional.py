"""Positional relevance (PA-LRP, Bakish et al. 2025): the presets, the result and its views.

The rule itself is checked against the independent float64 reference in ``test_reference_lrp``
(Llama's rotary angles, GPT-2's and BERT's added tables). Here: what a user sees, and, on every
causal LM of the zoo, that the relevance the positions receive is exactly what the tokens lose.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import lxt_plus
from lxt_plus.engine.plan import get_preset, load_preset
from lxt_plus.errors import LxtPlusWarning, UnsupportedModelError
from lxt_plus.render import colors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import families as F  # noqa: E402
import zoo  # noqa: E402


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return F.build("llama").double()


@pytest.fixture(scope="module")
def gpt2() -> torch.nn.Module:
    return F.build("gpt2").double()


def ids(rows: int = 1, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 90, (rows, seq), generator=torch.Generator().manual_seed(seed))


def test_presets_are_registered_everywhere(tmp_path: Path) -> None:
    names = lxt_plus.list_presets()
    assert "pa-attnlrp" in names and "pa-ah-lrp" in names
    assert get_preset("pa-attnlrp").positional and get_preset("pa-ah-lrp").positional
    assert not any(get_preset(n).positional for n in ("attnlrp", "ah-lrp", "cp-lrp", "gradient"))
    path = tmp_path / "mix.yaml"
    path.write_text("name: mix\nbase: attnlrp\nrules:\n  - select: attention\n    rule: pa-attnlrp\n")
    assert load_preset(path).positional
    assert load_preset(path).to_dict()["rules"][0] == {"select": "attention", "rule": "pa-attnlrp"}


def test_rotary_pairs_hold_token_plus_position(llama: torch.nn.Module) -> None:
    x = ids(2)
    base = lxt_plus.explain(llama, x, rules="attnlrp")
    pa = lxt_plus.explain(llama, x, rules="pa-attnlrp")
    assert base.positional is None and not base.pairs
    assert pa.pairs and pa.positional is not None and pa.positional.shape == (2, 7)
    layers = pa.positional_layers
    assert layers is not None and layers.shape == (2, llama.config.num_hidden_layers, 7)
    torch.testing.assert_close(layers.sum(1), pa.positional, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(pa.relevance, pa.token_relevance + pa.positional.double())
    # the positions take a share of the q/k paths: the token relevance changes, and not a little
    gap = (pa.token_relevance - base.relevance).abs().max() / base.relevance.abs().max()
    assert gap > 1e-3
    assert float(pa.positional.abs().max()) > 1e-3 * float(pa.relevance.abs().max())


@pytest.mark.parametrize("padded", [False, True])
def test_rows_of_a_batch_are_their_own(llama: torch.nn.Module, padded: bool) -> None:
    """Unpadded rows share one rotary table in transformers; each row still gets its own leaves."""
    x = ids(2, seed=3)
    mask = torch.ones_like(x)
    if padded:
        mask[1, -2:] = 0
    batch = lxt_plus.explain(llama, x, attention_mask=mask, rules="pa-attnlrp")
    assert batch.positional is not None
    assert (batch.positional[1, int(mask[1].sum()) :] == 0).all()
    for r in range(2):
        n = int(mask[r].sum())
        one = lxt_plus.explain(llama, x[r, :n], rules="pa-attnlrp")
        assert one.positional is not None
        torch.testing.assert_close(batch.positional[r, :n], one.positional, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(batch.relevance[r, :n], one.relevance, rtol=1e-6, atol=1e-10)


def test_eager_and_sdpa_agree() -> None:
    eager = F.build("llama", attn_implementation="eager").double()
    sdpa = F.build("llama", attn_implementation="sdpa").double()
    x = ids()
    a = lxt_plus.explain(eager, x, rules="pa-attnlrp")
    b = lxt_plus.explain(sdpa, x, rules="pa-attnlrp")
    # transformers computes the rotary angles in float32 in any dtype; the two paths round apart
    torch.testing.assert_close(a.positional, b.positional, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-5, atol=1e-8)


def test_constant_attention_weights_leave_rotary_angles_nothing(llama: torch.nn.Module) -> None:
    """Under AH-LRP the angles act only through the attention weights, which are constants."""
    x = ids()
    ah = lxt_plus.explain(llama, x, rules="ah-lrp")
    pa = lxt_plus.explain(llama, x, rules="pa-ah-lrp")
    assert pa.positional is not None and (pa.positional == 0).all()
    torch.testing.assert_close(pa.relevance, ah.relevance, rtol=0, atol=0)


def test_added_tables_join_their_tokens(gpt2: torch.nn.Module) -> None:
    x = ids()
    base = lxt_plus.explain(gpt2, x, rules="ah-lrp")
    pa = lxt_plus.explain(gpt2, x, rules="pa-ah-lrp")
    assert base.positional is not None and not base.pairs  # reported under every preset
    torch.testing.assert_close(base.positional, pa.positional)
    torch.testing.assert_close(pa.relevance, base.relevance + base.positional.double())
    # what moved into the tokens left the position-embedding total, so the balance is unchanged
    torch.testing.assert_close(
        pa.conservation["absorbed"], base.conservation["absorbed"], rtol=1e-6, atol=1e-9
    )
    assert float(pa.extra_relevance.abs().sum()) < 1e-9  # GPT-2 has no token types


def test_result_round_trips_and_slices(llama: torch.nn.Module) -> None:
    exp = lxt_plus.explain(llama, ids(2), rules="pa-attnlrp")
    back = lxt_plus.Explanation.from_dict(json.loads(json.dumps(exp.to_dict())))
    assert back.pairs
    torch.testing.assert_close(back.positional, exp.positional.float())
    torch.testing.assert_close(back.positional_layers, exp.positional_layers.float())
    row = exp[1]
    torch.testing.assert_close(row.positional, exp.positional[1])
    torch.testing.assert_close(row.token_relevance, exp.token_relevance[1])


def test_views_show_the_positions(llama: torch.nn.Module) -> None:
    exp = lxt_plus.explain(llama, ids(), rules="pa-attnlrp")
    html = exp.to_html()
    assert 'class="lxt-positions"' in html and html.count('class="lxt-pos"') == 7
    summary = exp.summary()
    assert "The positions carry" in summary and "included in the values above" in summary
    terminal = " ".join(exp.to_terminal(color=False).split())
    assert "The positions carry" in terminal and "positions: 0[" in terminal
    plain = lxt_plus.explain(llama, ids(), rules="attnlrp")
    assert 'class="lxt-positions"' not in plain.to_html() and "positions carry" not in plain.summary()

    def position_bars(e: lxt_plus.Explanation) -> list[str]:
        from matplotlib.colors import to_hex

        (ax,) = e.plot().axes[:1]
        return [to_hex(p.get_facecolor()) for p in ax.patches if p.get_gid() == "lxt-position"]

    scale = exp.positional[0] / colors.color_limit(exp.relevance[0], "max")
    assert position_bars(exp) == [colors.hex_color(float(v)) for v in scale.clamp(-1, 1)]
    assert position_bars(plain) == []


def test_a_model_without_positions_warns() -> None:
    model = zoo.build("xlnet", "causal-lm")
    with pytest.warns(LxtPlusWarning, match="no position encoding"):
        exp = lxt_plus.explain(model, ids(seq=5), rules="pa-attnlrp")
    assert exp.positional is None and not exp.pairs


def _one_layer(config: object) -> object:
    for name in zoo._SIZES[2]:
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, 1)
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and kinds:
        config.layer_types = [next((k for k in kinds if "attention" in str(k)), kinds[0])]  # type: ignore[attr-defined]
    return config


@pytest.mark.slow
def test_the_positions_get_what_the_tokens_lose_on_every_causal_lm(monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer, biases zeroed: everything upstream of ``q`` and ``k`` conserves, so the total
    relevance under ``pa-attnlrp`` equals that under ``attnlrp`` exactly. A product with a rotary
    angle that missed the uniform rule would count twice; one that a model computes in a way the
    rule does not see would leave the angles nothing."""
    torch.set_num_threads(1)
    tiny = zoo.tiny_config
    monkeypatch.setattr(zoo, "tiny_config", lambda model_type: _one_layer(tiny(model_type)))
    attn = dataclasses.replace(get_preset("attnlrp"), zero_bias=True, name="attnlrp-zero-bias")
    pa = dataclasses.replace(get_preset("pa-attnlrp"), zero_bias=True, name="pa-attnlrp-zero-bias")
    checked, rotary, bad = 0, 0, []
    for model_type in zoo.model_types("causal-lm"):
        try:
            model = zoo.build(model_type, "causal-lm")
            inputs = zoo._inputs(model)
            with torch.no_grad():
                model(**inputs)
        except Exception:  # noqa: BLE001 - not built (the zoo test reports these)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = lxt_plus.explain(model, inputs["input_ids"], rules=attn)
                p = lxt_plus.explain(model, inputs["input_ids"], rules=pa)
        except UnsupportedModelError:
            continue
        checked += 1
        rotary += p.positional_layers is not None and float(p.positional_layers.abs().sum()) > 0
        total_a = float(a.target_logit - a.conservation["absorbed"])
        total_p = float(p.target_logit - p.conservation["absorbed"])
        if abs(total_a - total_p) > 1e-4 * max(abs(total_a), 1e-6):
            bad.append(f"{model_type}: {total_p:.6g} under pa-attnlrp vs {total_a:.6g}")
    assert not bad, "\n".join(bad)
    assert checked >= 90 and rotary >= 50, (checked, rotary)


def test_a_position_buffer_read_in_forward_is_the_positions() -> None:
    """CTRL adds rows of a sinusoidal buffer (``pos_encoding[position_ids]``) in ``forward``, with
    no embedding module: those rows are position leaves, one per row of the batch, so that relevance
    conserves and each row's positions are its own."""
    model = zoo.build("ctrl", "causal-lm")
    x = torch.tensor([[3, 9, 27, 81, 12, 7], [5, 6, 7, 8, 9, 10]])
    both = lxt_plus.explain(model, x, rules="conservative-check")
    assert both.positional is not None and both.positional.shape == x.shape
    c = both.conservation
    for row in range(2):
        assert abs(float(c["absorbed"][row])) <= 1e-4 * abs(float(c["target_logit"][row]))
        assert abs(float(c["position_relevance"][row])) > 1e-3  # the table carries relevance
        alone = lxt_plus.explain(model, x[row : row + 1], rules="conservative-check")
        torch.testing.assert_close(both.positional[row], alone.positional[0], rtol=1e-5, atol=1e-7)


def test_copies_of_a_position_buffer_are_followed() -> None:
    """``table.to(dtype)`` makes a copy each call; rows read from the copy are leaves too."""
    from lxt_plus.engine.positional import position_buffer_leaves

    class Toy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("pos_table", torch.randn(10, 4))
            self.other_table = torch.nn.Buffer(torch.randn(10, 4))  # not named for positions

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            at = torch.arange(x.shape[0])
            return x + self.pos_table.to(x.dtype)[at] + self.other_table.to(x.dtype)[at]

    made: list[torch.Tensor] = []

    def make(t: torch.Tensor) -> torch.Tensor:
        made.append(t)
        return t.detach().requires_grad_(True)

    toy = Toy()
    with position_buffer_leaves(toy, make):
        out = toy(torch.zeros(3, 4, dtype=torch.float64))
    assert len(made) == 1 and made[0].shape == (3, 4) and made[0].dtype == torch.float64
    torch.testing.assert_close(made[0], toy.pos_table[:3].double())
    assert out.requires_grad
