"""lxt_plus's presets as inseq attribution methods: each generation step equals ``explain``."""

from __future__ import annotations

import sys
from pathlib import Path

import inseq
import pytest
import torch

import lxt_plus
import lxt_plus.inseq as lxt_inseq

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402


def test_methods_are_registered() -> None:
    assert set(lxt_inseq.METHODS) <= set(inseq.list_feature_attribution_methods())


@pytest.mark.parametrize("method", ["lxt_attnlrp", "lxt_cp_lrp"])
def test_every_step_equals_explain(method: str) -> None:
    model = F.randomize_biases_and_norms(F.build("llama"))
    tok = F.tiny_tokenizer()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    model.config.bos_token_id, model.config.eos_token_id = 2, 3
    model.generation_config.pad_token_id = 0
    wrapped = inseq.load_model(model, method, tokenizer=tok)
    out = wrapped.attribute(
        "the dog is",
        generation_args={"max_new_tokens": 3, "do_sample": False},
        attributed_fn="logit",
        show_progress=False,
    )
    seq = out.sequence_attributions[0]
    ids = torch.tensor([t.id for t in seq.target])
    steps = seq.target_attributions.sum(-1)  # (prefix + generated, generated)
    n_new = steps.shape[1]
    rules = lxt_inseq.METHODS[method]
    for k in range(n_new):
        end = ids.shape[0] - n_new + k
        ref = lxt_plus.explain(model, ids[:end], target=int(ids[end]), rules=rules)
        torch.testing.assert_close(steps[:end, k], ref.relevance, rtol=1e-5, atol=1e-6)


def test_register_method_takes_a_preset() -> None:
    cls = lxt_inseq.register_method("lxt_test_gradient", "gradient")
    assert "lxt_test_gradient" in inseq.list_feature_attribution_methods()
    assert cls.method_name == "lxt_test_gradient"
