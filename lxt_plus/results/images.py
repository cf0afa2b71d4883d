"""Relevance on images: per channel, summed over channels, and pooled over patches.

An :class:`ImageRelevance` travels with an explanation of an image classifier (where it is the
whole input) or of a vision-language model (beside the token relevance). It keeps the input pixels
too, so that renderers can overlay the heatmap on the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lxt_plus.errors import InputError

__all__ = ["ImageRelevance", "pool_patches", "patch_map", "patch_list_images"]


def pool_patches(relevance: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Sum ``(..., H, W)`` relevance over non-overlapping ``size`` × ``size`` patches; a border that
    does not fill a patch is a patch of its own (nothing is dropped, so sums are kept)."""
    ph, pw = (size, size) if isinstance(size, int) else size
    if ph < 1 or pw < 1:
        raise InputError(f"a patch size must be a positive number of pixels, got {size!r}")
    h, w = relevance.shape[-2:]
    pad_h, pad_w = -h % ph, -w % pw
    if pad_h or pad_w:
        relevance = torch.nn.functional.pad(relevance, (0, pad_w, 0, pad_h))
    lead = relevance.shape[:-2]
    grid = relevance.reshape(*lead, (h + pad_h) // ph, ph, (w + pad_w) // pw, pw)
    return grid.sum((-3, -1))


def patch_list_images(t: Tensor, shape: tuple[int, int], patch: int) -> Tensor:
    """SigLIP2's patch lists ``(batch, patches, P·P·C)`` (its processor cuts each image into a
    row-major grid of ``shape = (rows, columns)`` patches, each flattened as ``(P, P, C)``, then
    pads the list) back onto the image grid: ``(batch, C, rows·P, columns·P)``, padding dropped."""
    h, w = shape
    b, _, d = t.shape
    channels = d // (patch * patch)
    x = t[:, : h * w].reshape(b, h, w, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch, w * patch)


def patch_map(relevance: Tensor, size: int) -> Tensor:
    """``(..., H, W)`` relevance summed over ``size`` × ``size`` patches and spread back over each
    patch's pixels (same shape): the patch heatmap on the image grid, for overlays."""
    h, w = relevance.shape[-2:]
    grid = pool_patches(relevance, size)
    return grid.repeat_interleave(size, -2).repeat_interleave(size, -1)[..., :h, :w]


@dataclass
class ImageRelevance:
    """Relevance of the pixels of one or more images.

    Attributes
    ----------
    channels:
        ``(images, C, H, W)``: relevance of every pixel value.
    pixels:
        ``(images, C, H, W)``: the input values the model saw (after its processor).
    patch_size:
        The model's patch size in pixels (ViT-style models), or ``None``.
    rows:
        ``(images,)``: the batch row each image belongs to.
    """

    channels: Tensor
    pixels: Tensor
    patch_size: int | None = None
    rows: Tensor | None = None

    @property
    def relevance(self) -> Tensor:
        """``(images, H, W)``: relevance summed over the channels."""
        return self.channels.sum(1)

    def patches(self, size: int | None = None) -> Tensor:
        """``(images, H / size, W / size)``: relevance summed over patches of ``size`` pixels (the
        model's own patch size by default)."""
        size = size or self.patch_size
        if size is None:
            raise InputError("this model has no patch size; pass patch_relevance(size=...) in pixels")
        return pool_patches(self.relevance, size)

    def of_row(self, row: int) -> ImageRelevance:
        """The images of batch row ``row``."""
        keep = torch.arange(len(self.channels)) if self.rows is None else (self.rows == row).nonzero()[:, 0]
        if self.rows is None:
            keep = keep[row : row + 1]
        return ImageRelevance(
            self.channels[keep],
            self.pixels[keep],
            self.patch_size,
            None if self.rows is None else self.rows[keep],
        )

    def total(self) -> Tensor:
        """``(images,)``: the relevance of each image."""
        return self.channels.flatten(1).sum(-1)
