"""``explain(pipeline, input)``: the pipeline's own answer, on its own inputs, and the pipeline unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import lxt_plus
from lxt_plus.engine.patching import _PATCHED
from lxt_plus.errors import InputError, TargetError, UnsupportedModelError

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(pipe, before: dict[str, torch.Tensor], answer: object, call: object) -> None:
    assert _PATCHED.get(pipe.model) is None
    after = pipe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert call() == answer, "the pipeline answers differently after explain"


def test_text_classification() -> None:
    model = F.randomize_biases_and_norms(F.build("bert", head="seqcls"))
    tok = F.tiny_tokenizer()
    pipe = tf.pipeline("text-classification", model=model, tokenizer=tok)
    answer, before = pipe("the film was good"), _state(model)
    exp = lxt_plus.explain(pipe, "the film was good", rules="cp-lrp")
    label = model.config.label2id[answer[0]["label"]]
    ids = pipe.preprocess("the film was good")["input_ids"][0]
    ref = lxt_plus.explain(model, ids, target=label, rules="cp-lrp")
    assert exp.target.ids == (label,)
    torch.testing.assert_close(exp.relevance, ref.relevance, rtol=1e-6, atol=1e-7)
    _unchanged(pipe, before, answer, lambda: pipe("the film was good"))


def test_sentiment_analysis_alias_and_contrast() -> None:
    model = F.build("distilbert", head="seqcls")
    pipe = tf.pipeline("sentiment-analysis", model=model, tokenizer=F.tiny_tokenizer())
    predicted = model.config.label2id[pipe("a boring film")[0]["label"]]
    foil = (predicted + 1) % model.config.num_labels
    exp = lxt_plus.explain(pipe, "a boring film", contrast=foil)
    assert exp.target.ids == (predicted,) and exp.target.contrast_ids == (foil,)
    with pytest.raises(TargetError, match="the contrast is the target itself"):  # a zero margin
        lxt_plus.explain(pipe, "a boring film", contrast=predicted)


def test_text_generation_explains_the_generated_token() -> None:
    model = F.randomize_biases_and_norms(F.build("llama"))
    model.generation_config.pad_token_id = 0
    tok = F.tiny_tokenizer()
    pipe = tf.pipeline("text-generation", model=model, tokenizer=tok)
    kwargs = {"max_new_tokens": 2, "do_sample": False}
    answer, before = pipe("the dog is", **kwargs), _state(model)
    exp = lxt_plus.explain(pipe, "the dog is", pipeline_kwargs=kwargs)
    full = pipe("the dog is", return_tensors=True, **kwargs)[0]["generated_token_ids"]
    ids = pipe.preprocess("the dog is")["input_ids"][0]
    assert exp.target.ids == (full[len(ids)],)
    ref = lxt_plus.explain(model, ids, target=full[len(ids)])
    torch.testing.assert_close(exp.relevance, ref.relevance, rtol=1e-6, atol=1e-7)
    _unchanged(pipe, before, answer, lambda: pipe("the dog is", **kwargs))


def test_fill_mask_explains_the_filled_token() -> None:
    cfg = tf.AutoConfig.for_model(
        "bert",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    torch.manual_seed(0)
    model = F.randomize_biases_and_norms(tf.AutoModelForMaskedLM.from_config(cfg).eval())
    tok = F.tiny_tokenizer()
    tok.mask_token = "[UNK]"
    pipe = tf.pipeline("fill-mask", model=model, tokenizer=tok)
    text = "the dog [UNK] good"
    answer, before = pipe(text), _state(model)
    exp = lxt_plus.explain(pipe, text)
    ids = pipe.preprocess(text)["input_ids"][0]
    where = int((ids == tok.mask_token_id).nonzero()[0, 0])
    best = answer[0]["token"]
    with torch.no_grad():
        logit = model(input_ids=ids[None]).logits[0, where, best]
    torch.testing.assert_close(exp.target_logit, logit.reshape(1), rtol=1e-5, atol=1e-6)
    ref = lxt_plus.explain(model, ids, target=lambda out, pos: out.logits[:, where, best], position=where)
    torch.testing.assert_close(exp.relevance, ref.relevance, rtol=1e-6, atol=1e-7)
    assert exp.targets[0].position == ref.targets[0].position == where  # the mask is the explained position
    _unchanged(pipe, before, answer, lambda: pipe(text))
    with pytest.raises(InputError, match="2 mask tokens"):
        lxt_plus.explain(pipe, "the [UNK] dog [UNK]")


def test_image_classification() -> None:
    cfg = tf.ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = F.randomize_biases_and_norms(tf.ViTForImageClassification(cfg).eval())
    proc = tf.ViTImageProcessorPil(size={"height": 8, "width": 8})
    pipe = tf.pipeline("image-classification", model=model, image_processor=proc)
    img = Image.fromarray((np.random.default_rng(0).random((12, 12, 3)) * 255).astype("uint8"))
    answer, before = pipe(img), _state(model)
    exp = lxt_plus.explain(pipe, img)
    label = model.config.label2id[answer[0]["label"]]
    ref = lxt_plus.explain(model, proc(img, return_tensors="pt")["pixel_values"][0], target=label)
    assert exp.relevance.shape == (8, 8)
    torch.testing.assert_close(exp.relevance, ref.relevance, rtol=1e-6, atol=1e-7)
    _unchanged(pipe, before, answer, lambda: pipe(img))


def test_other_pipelines_and_bad_arguments_are_refused() -> None:
    model = F.build("bert", head="seqcls")
    tok = F.tiny_tokenizer()
    feats = tf.pipeline("feature-extraction", model=model.base_model, tokenizer=tok)
    with pytest.raises(UnsupportedModelError, match="feature-extraction"):
        lxt_plus.explain(feats, "the dog")
    pipe = tf.pipeline("text-classification", model=model, tokenizer=tok)
    with pytest.raises(InputError, match="tokenises its inputs itself"):
        lxt_plus.explain(pipe, "the dog", tokenizer=tok)
    with pytest.raises(InputError, match="one pipeline input at a time"):
        lxt_plus.explain(pipe, ["the dog", "a cat"])
    with pytest.raises(InputError, match="pipeline_kwargs"):
        lxt_plus.explain(model, "the dog", tokenizer=tok, pipeline_kwargs={"top_k": 2})
