"""The whole zoo: no architecture in transformers returns non-conserving relevance without an error.

Every model class of the CausalLM, SequenceClassification, Seq2SeqLM, MaskedLM,
ImageClassification and ImageTextToText auto mappings is
built from a tiny random config (tests/zoo.py) and explained under ``conservative-check``: it must
conserve, or be refused with ``UnsupportedModelError``. ``benchmarks/support_table.py`` writes the
same statuses, under every preset, to docs/support.md.
"""

from __future__ import annotations

import collections
import sys

import pytest
import torch

sys.path.insert(0, "tests")
import zoo  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("head", list(zoo.HEADS))
def test_no_architecture_is_silently_wrong(head: str) -> None:
    torch.set_num_threads(1)
    rows = [zoo.status(t, head, "conservative-check") for t in zoo.model_types(head)]
    counts = collections.Counter(s.status for s in rows)
    bad = [f"{s.model_type}: {s.status}: {s.detail}" for s in rows if s.status in ("wrong", "failed")]
    assert not bad, "\n".join(bad)
    built = len(rows) - counts["not built"]
    # the harness must really build the zoo: a test over nothing would pass
    assert (
        built
        >= {
            "causal-lm": 100,
            "seqcls": 70,
            "seq2seq": 15,
            "masked-lm": 30,
            "image-cls": 35,
            "image-text": 20,
        }[head]
    ), counts
    assert counts["conserves"] >= 0.85 * built, counts
    for s in rows:
        if s.status == "refused":
            assert "operation" in s.detail or "module" in s.detail or "embeddings" in s.detail, s.detail
    # audit, module by module on the same input, says ok exactly where relevance conserves
    verdicts = {s.model_type: zoo.audit_ok(s.model_type, head) for s in rows if s.status != "not built"}
    disagree = [
        f"{s.model_type}: {s.status}, audit {verdicts[s.model_type]}"
        for s in rows
        if s.status != "not built" and (verdicts[s.model_type] is True) != (s.status == "conserves")
    ]
    assert not disagree, "\n".join(disagree)


def test_zoo_status_can_report_wrong() -> None:
    """The zoo's own check can fail: a model whose relevance is scaled after explaining is wrong."""
    import lxt_plus

    real = lxt_plus.explain

    def halved(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        result.batch_relevance = result.batch_relevance * 0.5
        return result

    zoo.lxt_plus.explain = halved  # type: ignore[attr-defined]
    try:
        assert zoo.status("llama", "causal-lm", "conservative-check").status == "wrong"
    finally:
        zoo.lxt_plus.explain = real  # type: ignore[attr-defined]


def test_transposed_embeddings() -> None:
    """XLNet embeds the transposed ids (seq, batch): relevance still lands on the right tokens."""
    import lxt_plus

    model = zoo.build("xlnet", "seqcls")
    ids = zoo._inputs(model)["input_ids"]
    got = lxt_plus.explain(model, ids, rules="conservative-check")
    assert got.batch_relevance.shape == ids.shape
    c = got.conservation
    assert abs(float(c["absorbed"])) <= 1e-4 * abs(float(c["target_logit"]))


# Architectures that each mechanism below made conserve; each was refused before it.
CONSERVE_BY_MECHANISM = {
    "fft is linear (FNet's Fourier mixing)": [("masked-lm", "fnet"), ("seqcls", "fnet")],
    "an activation made in the head's call (ACT2FN[name](x))": [
        ("seqcls", "big_bird"),
        ("seqcls", "nystromformer"),
    ],
    "a product with a shifted factor ((up + 1) * glu)": [
        ("causal-lm", "gpt_oss"),
        ("causal-lm", "minimax_m3_vl_text"),
    ],
    "a gated MLP named Gating is no router": [("causal-lm", "moshi")],
    "stacks without get_input_embeddings (FSMT)": [("seq2seq", "fsmt")],
    "attention modules named MLA": [("causal-lm", "longcat_flash")],
    "an input-dependent attention mask under AH-LRP (Doge)": [("causal-lm", "doge")],
    "a position table read from a buffer in forward (CTRL)": [("causal-lm", "ctrl"), ("seqcls", "ctrl")],
    "a position embedding's weight read whole and resized in forward (SigLIP2, GLM-4V)": [
        ("image-cls", "siglip2"),
        ("image-text", "glm4v"),
    ],
    "a vision tower checked on the first input with images, its learned newline token (LLaVA-Next)": [
        ("image-text", "llava_next")
    ],
    "an exp of input-dependent scores held constant with the weights, square(relu) (RWKV)": [
        ("causal-lm", "rwkv")
    ],
    "a vision config shrunk whole (Pixtral's head width, VipLlava's feature taps), patch lists (LFM2-VL)": [
        ("image-text", "mistral3"),
        ("image-text", "vipllava"),
        ("image-text", "lfm2_vl"),
    ],
    "linear attention without a softmax, seen by its products in the checked pass (MiniMax)": [
        ("causal-lm", "minimax"),
        ("seqcls", "minimax"),
    ],
}


@pytest.mark.parametrize(
    ("head", "model_type"),
    [pair for pairs in CONSERVE_BY_MECHANISM.values() for pair in pairs],
    ids=[f"{h}-{t}" for pairs in CONSERVE_BY_MECHANISM.values() for h, t in pairs],
)
def test_formerly_refused_architectures_conserve(head: str, model_type: str) -> None:
    torch.set_num_threads(1)
    s = zoo.status(model_type, head, "conservative-check")
    assert s.status == "conserves", s.detail


def test_bamba_conserves_with_a_config_of_its_own() -> None:
    """Bamba (Mamba2 mixers and attention) needs a config the generic shrinking cannot make (its
    per-layer types are derived): built by hand, every preset runs and conservative-check conserves."""
    import transformers as tf

    import lxt_plus

    torch.manual_seed(0)
    cfg = tf.BambaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_d_state=16,
        mamba_n_groups=1,
        mamba_expand=2,
        mamba_chunk_size=16,
        attn_layer_indices=[1],
    )
    model = tf.BambaForCausalLM(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    res = lxt_plus.explain(model, ids, rules="conservative-check")
    c = res.conservation
    assert abs(float(c["absorbed"][0])) <= 1e-5 * abs(float(c["target_logit"][0]))
    for rules in ("attnlrp", "cp-lrp", "ah-lrp"):
        lxt_plus.explain(model, ids, rules=rules)


def test_head_activation_hook_is_held_for_the_head_call_only() -> None:
    """The global hook that rules BigBird's ``ACT2FN`` activation exists during the classifier's
    call only: not inside the backbone, and not after explaining."""
    from torch.nn.modules import module as torch_module

    import lxt_plus

    model = zoo.build("big_bird", "seqcls")
    ids = zoo._inputs(model)["input_ids"]
    with torch.no_grad():
        model(ids)  # BigBird switches to full attention for short inputs on its first call
    inside: list[int] = []
    model.base_model.encoder.register_forward_pre_hook(  # pre-hooks of base_model run before the rule
        lambda m, a: inside.append(len(torch_module._global_forward_hooks))
    )
    seen: list[int] = []
    model.classifier.out_proj.register_forward_pre_hook(
        lambda m, a: seen.append(len(torch_module._global_forward_hooks))
    )
    lxt_plus.explain(model, ids, rules="conservative-check")
    assert inside and set(inside) == {0}
    assert seen and set(seen) == {1}
    assert not torch_module._global_forward_hooks


# ------------------------------------------------------------------ batches with padding
PADDED = [("causal-lm", "right"), ("causal-lm", "left"), ("seqcls", "right"), ("masked-lm", "right")]


@pytest.mark.slow
@pytest.mark.parametrize(("head", "side"), PADDED, ids=[f"{h}-{s}" for h, s in PADDED])
def test_padded_batches_explain_each_row_as_if_alone(head: str, side: str) -> None:
    """Two texts of different lengths in one padded batch, over the whole text zoo: each row
    conserves, and equals its text explained alone unless the model itself reads the padding."""
    torch.set_num_threads(1)
    rows = [zoo.batch_status(t, head, side) for t in zoo.model_types(head)]
    bad = [f"{s.model_type}: {s.status}: {s.detail}" for s in rows if s.status in ("wrong", "failed")]
    assert not bad, "\n".join(bad)
    counts = collections.Counter(s.status for s in rows)
    assert counts["conserves"] >= {"causal-lm": 120, "seqcls": 60, "masked-lm": 25}[head], counts


@pytest.mark.parametrize(
    ("model_type", "head", "side"),
    [
        ("marian", "causal-lm", "right"),  # a sinusoidal table (seq, width) shared by the rows
        ("pegasus", "causal-lm", "right"),
        ("roberta", "causal-lm", "left"),  # positions numbered from the ids, after padding_idx
        ("roberta", "masked-lm", "right"),
        ("gpt2", "causal-lm", "left"),  # learned absolute positions: the left-padded row renumbered
    ],
)
def test_padded_rows_equal_their_texts_alone(model_type: str, head: str, side: str) -> None:
    torch.set_num_threads(1)
    s = zoo.batch_status(model_type, head, side)
    assert s.status == "conserves" and s.detail == "", s.detail


def test_padding_the_model_reads_is_reported() -> None:
    """FNet mixes every position, padding included: the padding's relevance is reported (in
    position_relevance, so the row conserves) and a warning says so; it is not dropped."""
    import lxt_plus
    from lxt_plus.errors import LxtPlusWarning

    model = zoo.build("fnet", "masked-lm")
    ids = zoo._inputs(model)["input_ids"][0].tolist()
    batch = torch.tensor([ids, ids[:4] + [0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    with pytest.warns(LxtPlusWarning, match="padding tokens influence"):
        got = lxt_plus.explain(model, batch, attention_mask=mask, rules="conservative-check")
    c = got.conservation
    logit = torch.as_tensor(c["target_logit"]).double()
    assert (torch.as_tensor(c["absorbed"]).double().abs() <= 1e-4 * logit.abs()).all(), c
    assert got.batch_relevance[1, 4:].abs().max() == 0  # the heatmap still shows no padding
    assert abs(float(c["position_relevance"][1])) > 1e-3 * abs(float(logit[1]))


# ------------------------------------------------------------------ per-head relevance across the zoo
@pytest.mark.parametrize(
    ("model_type", "head"),
    [
        ("qwen3_next", "causal-lm"),  # hybrid: its first layer is linear attention, without heads
        ("t5", "seq2seq"),  # the encoder's blocks, not a block's list of parts
        ("xlm", "seqcls"),  # a list of attention modules is the block list
        ("modernbert", "seqcls"),  # output projection named Wo
        ("moshi", "causal-lm"),  # output projection wrapping a plain linear (o_proj.linear)
    ],
)
def test_head_relevance_is_what_enters_each_output_projection(model_type: str, head: str) -> None:
    """Per-head relevance sums, layer by layer, to the relevance that audit measures at the input
    of that layer's attention output projection; layers without softmax attention report zeros."""
    import lxt_plus
    from lxt_plus.api.capture import find_blocks

    torch.set_num_threads(1)
    model = zoo.build(model_type, head)
    inputs = zoo._inputs(model)
    ids = inputs["input_ids"]
    dec = inputs.get("decoder_input_ids")
    got = lxt_plus.explain(model, ids, decoder_input_ids=dec, rules="conservative-check", capture="heads")
    heads = got.captures["heads"][0]
    report = lxt_plus.audit(model, "conservative-check", inputs=dict(inputs) if dec is not None else ids)
    flows = {f.path: f for f in report.flows}
    paths = {id(m): p for p, m in model.named_modules()}
    parts = find_blocks(model)[1]
    assert heads.shape[0] == len(parts) == model.config.num_hidden_layers  # the blocks, not their parts
    with_heads = 0
    for i, part in enumerate(parts):
        if part.out_proj is None:
            assert heads[i].abs().max() == 0
            continue
        with_heads += 1
        want = flows[paths[id(part.out_proj)]].relevance_in
        assert abs(float(heads[i].sum()) - want) <= 1e-5 * abs(float(got.target_logit[0])) + 1e-7, (i, want)
    assert with_heads >= 1
    if model_type == "qwen3_next":
        assert parts[0].out_proj is None


@pytest.mark.slow
@pytest.mark.parametrize("head", list(zoo.HEADS))
def test_eager_and_sdpa_give_the_same_relevance_across_the_zoo(head: str) -> None:
    """Every architecture with both attention implementations: the same weights and input under
    SDPA, then eager attention, give the same relevance on tokens and pixels (AttnLRP). Models
    whose own outputs differ between the two (PaliGemma's prefix mask) are not compared."""
    torch.set_num_threads(1)
    rows = [zoo.attention_status(t, head) for t in zoo.model_types(head)]
    bad = [f"{s.model_type}: {s.status}: {s.detail}" for s in rows if s.status in ("wrong", "failed")]
    assert not bad, "\n".join(bad)
    same = sum(s.status == "same" for s in rows)
    assert (
        same
        >= {
            "causal-lm": 100,
            "seqcls": 60,
            "seq2seq": 12,
            "masked-lm": 18,
            "image-cls": 10,
            "image-text": 22,
        }[head]
    ), collections.Counter(s.status for s in rows)


LAYER_HEADS = ("causal-lm", "seqcls", "masked-lm", "image-cls", "image-text")


@pytest.mark.slow
@pytest.mark.parametrize("head", LAYER_HEADS)
def test_layer_rows_sum_to_the_logit_across_the_zoo(head: str) -> None:
    """capture='layers' over the zoo: each layer's residual-stream row conserves, or lxt_plus says
    why it cannot capture layers (hierarchical stages, attention kept in a list of its own)."""
    torch.set_num_threads(1)
    rows = [zoo.layers_status(t, head) for t in zoo.model_types(head)]
    bad = [f"{s.model_type}: {s.status}: {s.detail}" for s in rows if s.status in ("wrong", "failed")]
    assert not bad, "\n".join(bad)
    counts = collections.Counter(s.status for s in rows)
    assert (
        counts["conserves"]
        >= {"causal-lm": 120, "seqcls": 60, "masked-lm": 25, "image-cls": 12, "image-text": 18}[head]
    ), counts


@pytest.mark.parametrize(
    ("model_type", "head"),
    [
        ("xlnet", "seqcls"),  # sequence-first hidden states (seq, batch, width)
        ("qwen2_vl", "image-text"),  # the language model's blocks, not the vision tower's
        ("swin", "image-cls"),  # stages of different token counts: a clear error
        ("xlm", "seqcls"),  # attention modules in a list of their own: a clear error
    ],
)
def test_layer_capture_mechanisms(model_type: str, head: str) -> None:
    torch.set_num_threads(1)
    s = zoo.layers_status(model_type, head)
    if model_type in ("swin", "xlm"):
        assert s.status == "refused" and "InputError" in s.detail, s.detail
    else:
        assert s.status == "conserves", s.detail


def test_encoder_layer_rows_carry_the_encoder_share() -> None:
    """T5 (no position tables): the encoder's rows sum to the source tokens' relevance."""
    import lxt_plus

    model = zoo.build("t5", "seq2seq")
    inputs = zoo._inputs(model)
    got = lxt_plus.explain(
        model,
        inputs["input_ids"],
        decoder_input_ids=inputs["decoder_input_ids"],
        rules="conservative-check",
        capture="layers",
    )
    rows = got.captures["layers"][0].double().sum(-1)
    assert rows.shape[0] == model.config.num_layers + 1
    want = float(got.relevance.double().sum())
    assert (rows - want).abs().max() <= 1e-5 * abs(float(got.target_logit[0])), (rows, want)
