"""Pad positions get exactly zero relevance, even from a model whose own masking lets them leak."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import lxt_plus

sys.path.insert(0, str(Path(__file__).parents[1]))
import families as F  # noqa: E402


def test_pad_positions_get_zero_relevance_even_when_the_model_reads_them() -> None:
    model = F.build("bert", "seqcls")
    original = type(model).forward

    def ignores_the_mask(self: Any, *args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
        return original(self, *args, attention_mask=None, **kwargs)  # pads take part in attention

    model.forward = ignores_the_mask.__get__(model)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    res = lxt_plus.explain(model, ids, attention_mask=mask, rules="ah-lrp")
    assert res.batch_relevance[1, -3:].abs().max() == 0  # reported as zero, by contract
    assert res.batch_relevance[1, :-3].abs().max() > 0
    # the model really did read them: plain gradients reach the pad embeddings
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits[1].max().backward()
    assert embeds.grad[1, -3:].abs().max() > 0
