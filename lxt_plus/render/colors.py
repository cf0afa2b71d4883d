"""The diverging colour scale every renderer shares.

White at zero, red for positive and blue for negative relevance; the intensity grows linearly with
``|normalised relevance|`` (values are clipped to ``[-1, 1]``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "POSITIVE",
    "NEGATIVE",
    "WHITE",
    "rgb",
    "hex_color",
    "text_rgb",
    "text_color",
    "css_gradient",
    "palette",
    "color_limit",
    "colormap",
    "overlay",
]

RGB = tuple[int, int, int]

POSITIVE: RGB = (215, 25, 28)
NEGATIVE: RGB = (30, 90, 200)
WHITE: RGB = (255, 255, 255)
DARK_TEXT: RGB = (17, 17, 17)
LIGHT_TEXT: RGB = (255, 255, 255)


def rgb(value: float) -> RGB:
    """Background colour of a normalised relevance value in ``[-1, 1]`` (NaN counts as 0)."""
    v = 0.0 if math.isnan(value) else max(-1.0, min(1.0, float(value)))
    end = POSITIVE if v > 0 else NEGATIVE
    a = abs(v)
    return tuple(round(w + a * (e - w)) for w, e in zip(WHITE, end, strict=True))  # type: ignore[return-value]


def _hex(c: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def hex_color(value: float) -> str:
    """:func:`rgb` as ``"#rrggbb"``."""
    return _hex(rgb(value))


def _luminance(c: RGB) -> float:
    lin = [(x / 255) / 12.92 if x <= 10 else ((x / 255 + 0.055) / 1.055) ** 2.4 for x in c]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def text_rgb(value: float) -> RGB:
    """Near-black or white text, whichever has the higher WCAG contrast on :func:`rgb` of ``value``.

    The text sits on its own background, so it reads the same on dark and light terminals and pages.
    """
    bg = _luminance(rgb(value))
    dark = (bg + 0.05) / (_luminance(DARK_TEXT) + 0.05)
    light = (_luminance(LIGHT_TEXT) + 0.05) / (bg + 0.05)
    return DARK_TEXT if dark >= light else LIGHT_TEXT


def text_color(value: float) -> str:
    """:func:`text_rgb` as ``"#rrggbb"``."""
    return _hex(text_rgb(value))


def css_gradient(stops: int = 11) -> str:
    """A CSS ``linear-gradient`` from -1 (left) through 0 to +1 (right)."""
    colors = [hex_color(-1 + 2 * i / (stops - 1)) for i in range(stops)]
    return f"linear-gradient(to right, {', '.join(colors)})"


def palette(half: int = 50) -> tuple[list[str], list[str]]:
    """Background and text colours of ``2 * half + 1`` levels from -1 to +1 (for client-side lookup)."""
    values = [(k - half) / half for k in range(2 * half + 1)]
    return [hex_color(v) for v in values], [text_color(v) for v in values]


def color_limit(relevance: torch.Tensor, method: str) -> float:
    """The raw relevance that gets full colour under normalisation ``method`` (the legend's end label)."""
    if relevance.numel() == 0 or method == "none":
        return 1.0
    a = relevance.detach().abs().float()
    return float(a.max() if method == "max" else a.sum())


def overlay(image: torch.Tensor, relevance: torch.Tensor, limit: float) -> torch.Tensor:
    """The heatmap over the image, ``(H, W, 3)`` floats in ``[0, 1]``: the image in grey (its own
    range stretched), tinted by the token scale's colours in proportion to ``|relevance| / limit``
    (zero relevance leaves the image as it is). ``image``: ``(C, H, W)`` with 1 or 3 channels."""
    img = image.detach().float().cpu()
    grey = img.mean(0) if img.shape[0] != 3 else 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    lo, hi = float(grey.min()), float(grey.max())
    grey = (grey - lo) / (hi - lo) if hi > lo else torch.full_like(grey, 0.5)
    base = (0.25 + 0.75 * grey)[..., None].expand(*grey.shape, 3)
    v = (relevance.detach().float().cpu() / (limit or 1.0)).clamp(-1, 1)
    pos = torch.tensor(POSITIVE, dtype=torch.float32) / 255
    neg = torch.tensor(NEGATIVE, dtype=torch.float32) / 255
    tint = torch.where(v[..., None] > 0, pos, neg)
    a = v.abs()[..., None]
    return base * (1 - a) + tint * a


def colormap(name: str = "lxt_plus") -> Any:
    """The scale as a matplotlib colormap over ``[-1, 1]`` (needs matplotlib)."""
    from matplotlib.colors import LinearSegmentedColormap

    colors = [tuple(x / 255 for x in rgb(-1 + 2 * i / 20)) for i in range(21)]
    return LinearSegmentedColormap.from_list(name, colors)
