"""The result of explaining an image-text similarity (CLIP, SigLIP): relevance on both sides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lxt_plus.results.images import ImageRelevance

__all__ = ["SimilarityExplanation"]


@dataclass
class SimilarityExplanation:
    """Which image pixels and which caption tokens make a caption match an image.

    Attributes
    ----------
    score:
        The explained similarity: ``logit_scale · cos(image, text)`` (``+ logit_bias`` for SigLIP).
    tokens:
        The caption's token strings.
    token_relevance:
        ``(seq,)`` relevance of the caption's tokens (0 at padding).
    images:
        Pixel relevance of the image (:class:`~lxt_plus.results.images.ImageRelevance`).
    position_relevance:
        Relevance taken by the two towers' position tables.
    rules:
        The preset.
    pairs:
        With ``explain_similarity(..., pairs=True)``: BiLRP's ``(patch rows, patch cols, tokens)``
        relevance of each (image patch, caption token) pair; ``None`` otherwise.
    pair_position_relevance:
        With ``pairs``: the part of the score BiLRP gives to pairs that involve a position table.
    """

    score: float
    tokens: list[str]
    token_relevance: torch.Tensor
    images: ImageRelevance
    position_relevance: float
    rules: str
    pairs: torch.Tensor | None = None
    pair_position_relevance: float | None = None

    def _require_pairs(self) -> torch.Tensor:
        if self.pairs is None:
            from lxt_plus.errors import InputError

            raise InputError(
                "this explanation has no pair relevance; pass explain_similarity(..., pairs=True)"
            )
        return self.pairs

    def token_patches(self, token: int | str) -> torch.Tensor:
        """``(patch rows, patch cols)``: which image patches match caption token ``token`` (its
        index, or its string: the first token that equals it), from :attr:`pairs`."""
        pairs = self._require_pairs()
        if isinstance(token, str):
            if token not in self.tokens:
                from lxt_plus.errors import InputError

                raise InputError(f"token {token!r} is not in the caption: {self.tokens}")
            token = self.tokens.index(token)
        return pairs[..., token]

    def top_pairs(self, k: int = 5) -> list[tuple[tuple[int, int], str, float]]:
        """The ``k`` pairs with the largest relevance: ((patch row, patch col), token, value)."""
        pairs = self._require_pairs()
        values, flat = pairs.flatten().topk(min(k, pairs.numel()))
        _, w, t = pairs.shape
        return [
            ((i // (w * t), (i // t) % w), self.tokens[i % t], float(v))
            for v, i in zip(values.tolist(), flat.tolist(), strict=True)
        ]

    @property
    def image_relevance(self) -> torch.Tensor:
        """``(H, W)``: pixel relevance summed over channels."""
        return self.images.relevance[0]

    def patch_relevance(self, size: int | None = None) -> torch.Tensor:
        """``(H / size, W / size)``: pixel relevance over patches (the model's patch size by default)."""
        return self.images.patches(size)[0]

    @property
    def conservation(self) -> dict[str, float]:
        """Text, image and position relevance beside the score; ``absorbed`` is the rest (biases,
        and the AttnLRP softmax's share); 0 under ``conservative-check``."""
        text = float(self.token_relevance.sum())
        image = float(self.images.total().sum())
        return {
            "text_relevance": text,
            "image_relevance": image,
            "position_relevance": self.position_relevance,
            "score": self.score,
            "absorbed": self.score - text - image - self.position_relevance,
        }

    def to_html(self, normalize: str = "max") -> str:
        """The caption's tokens and the image, each coloured by its own relevance (one scale for both)."""
        from lxt_plus.render.html import similarity_html

        return similarity_html(self, normalize)

    def _repr_html_(self) -> str:
        return self.to_html()

    def __repr__(self) -> str:
        c = self.conservation
        return (
            f"SimilarityExplanation(score={self.score:.4g}, text={c['text_relevance']:+.4g}, "
            f"image={c['image_relevance']:+.4g}, positions={c['position_relevance']:+.4g}, "
            f"rules={self.rules!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "tokens": list(self.tokens),
            "token_relevance": self.token_relevance.tolist(),
            "image_relevance": self.images.relevance.tolist(),
            "position_relevance": self.position_relevance,
            "rules": self.rules,
            **(
                {}
                if self.pairs is None
                else {"pairs": self.pairs.tolist(), "pair_position_relevance": self.pair_position_relevance}
            ),
        }
