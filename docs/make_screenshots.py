"""Render the README's use-case images (run from the repository root)."""

from __future__ import annotations

from pathlib import Path

import torch

import lxt_plus
from lxt_plus import demo as models
from lxt_plus.render.latent import plot_layers

torch.set_num_threads(1)
out = Path(__file__).parent / "images"
out.mkdir(exist_ok=True)

lm, tok = models.load_smollm2()
lxt_plus.explain(lm, "The capital of France is", tokenizer=tok, target=" Paris", contrast=" Lyon").save(
    str(out / "llm_paris_vs_lyon.png")
)
layers = lxt_plus.explain(lm, "The capital of France is", tokenizer=tok, capture=("layers",))
plot_layers(layers).savefig(out / "relevance_by_layer.png", dpi=120, bbox_inches="tight")

clf, ctok = models.load_sentiment_classifier()
lxt_plus.explain(
    clf, "A gorgeous, witty film, though the ending drags badly.", tokenizer=ctok, target="POSITIVE"
).save(str(out / "sentiment.png"), words=True)

vision = models.train_vit_digits(progress=False)
with torch.no_grad():
    wrong = (vision.model(pixel_values=vision.X_test).logits.argmax(-1) != vision.y_test).nonzero()
index = int(wrong[0]) if len(wrong) else 0
lxt_plus.explain(vision.model, vision.X_test[index]).save(str(out / "vision_digit.png"))
print("done", sorted(p.name for p in out.iterdir()))
