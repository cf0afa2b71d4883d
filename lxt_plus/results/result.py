"""The result of an explanation: tokens, signed relevance, the target and the conservation check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lxt_plus.errors import InputError
from lxt_plus.results.captures import Captures
from lxt_plus.results.conservation import WHERE, WHY, conservation_kind
from lxt_plus.results.serialize import (
    explanation_fields,
    explanation_to_dict,
    generation_fields,
    generation_to_dict,
)

if TYPE_CHECKING:
    from lxt_plus.results.images import ImageRelevance
    from lxt_plus.results.segments import Segments

__all__ = ["Explanation", "GenerationExplanation", "Target", "explanation_from_dict", "generation_from_dict"]


@dataclass(frozen=True)
class Target:
    """What was explained for one row.

    Attributes
    ----------
    kind:
        ``"token"`` (causal LM next-token logit), ``"class"`` (classifier logit), ``"output"``
        (an index into a plain model's output) or ``"function"`` (a target function of the model
        output; ``label`` is its name).
    ids:
        Token ids or class indices whose logits are summed.
    label:
        Human-readable name (the decoded token string or the class label).
    position:
        Sequence position whose logits are explained (causal LM), else ``None``.
    contrast_ids, contrast_label:
        The foil, when a contrastive target ``logit(target) - logit(foil)`` is explained.
    """

    kind: str
    ids: tuple[int, ...]
    label: str
    position: int | None = None
    contrast_ids: tuple[int, ...] = ()
    contrast_label: str | None = None

    def describe(self) -> str:
        text = repr(self.label)
        if self.contrast_label is not None:
            text += f" vs {self.contrast_label!r}"
        if self.position is not None:
            text += f" @ position {self.position}"
        return text


@dataclass
class Explanation:
    """Relevance for one sequence or a batch.

    ``relevance`` has shape ``(seq,)`` for one sequence and ``(batch, seq)`` for a batch (pixels:
    ``(H, W)`` / ``(batch, H, W)``; features: ``(n_features,)`` / ``(batch, n_features)``).
    Padding positions get exactly 0.

    Attributes
    ----------
    tokens:
        Token strings per row (empty strings for padding), or feature names.
    token_ids:
        ``(batch, seq)`` input ids, or ``None`` for non-token inputs.
    attention_mask:
        ``(batch, seq)``, 1 for real tokens.
    targets:
        One :class:`Target` per row.
    target_logit:
        ``(batch,)`` the explained value (logit, summed logits, or logit difference).
    probability:
        ``(batch,)`` softmax probability of the target (first id), ``None`` for plain models.
    rules:
        Name of the preset used.
    modality:
        ``"tokens"``, ``"pixels"`` or ``"features"``.
    captures:
        Latent relevance requested with ``capture=`` (layers, heads, neurons): a
        :class:`~lxt_plus.results.captures.Captures`, which also reads as a dict.
    positional_relevance, positional_layers, pairs:
        Relevance of each token's position ``(batch, seq)``, its rotary share per attention layer
        ``(batch, layers, seq)``, and whether ``relevance`` holds token plus position (the
        ``pa-`` presets); see :attr:`positional` and :attr:`token_relevance`.
    """

    batch_relevance: torch.Tensor
    tokens: list[list[str]]
    token_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    targets: list[Target]
    target_logit: torch.Tensor
    probability: torch.Tensor | None
    rules: str
    single: bool = True
    modality: str = "tokens"
    captures: Captures = field(default_factory=Captures)
    extra_relevance: torch.Tensor | None = (
        None  # (batch,) relevance absorbed by position/type embeddings etc.
    )
    hidden: torch.Tensor | None = None  # (batch, seq) True for special / chat-template tokens
    # encoder-decoder models: relevance of the decoder prefix (batch, decoder_len) and its ids;
    # ``relevance`` is then over the encoder's input tokens
    decoder_relevance: torch.Tensor | None = None
    decoder_ids: torch.Tensor | None = None
    # pixel relevance per channel, with the input pixels (image classifiers and VLMs)
    images: ImageRelevance | None = None
    # PA-LRP: relevance of each token's position (batch, seq), its rotary share per attention
    # layer (batch, layers, seq), and whether ``relevance`` holds token plus position
    positional_relevance: torch.Tensor | None = None
    positional_layers: torch.Tensor | None = None
    pairs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.captures, Captures):  # a plain dict of captures is accepted
            self.captures = Captures.from_mapping(self.captures)

    # ------------------------------------------------------------------ tensors
    @property
    def relevance(self) -> torch.Tensor:
        """Signed relevance, ``(seq,)`` for one sequence or ``(batch, seq)`` for a batch."""
        return self.batch_relevance[0] if self.single else self.batch_relevance

    @property
    def target(self) -> Target | list[Target]:
        return self.targets[0] if self.single else self.targets

    # ------------------------------------------------------------------ positions (PA-LRP)
    @property
    def positional(self) -> torch.Tensor | None:
        """Relevance of each token's position, ``(seq,)`` / ``(batch, seq)``: the share of added
        position tables (learned, sinusoidal) under every preset, plus the rotary angles' share
        under ``pa-attnlrp``. ``None`` for a model without a position encoding that takes relevance
        (a rotary model under a preset that is not positional)."""
        p = self.positional_relevance
        return None if p is None else (p[0] if self.single else p)

    @property
    def token_relevance(self) -> torch.Tensor:
        """Relevance of the tokens alone. Under the positional presets (``pa-attnlrp``,
        ``pa-ah-lrp``) ``relevance`` is token plus position, per position; elsewhere the two are
        the same."""
        if not self.pairs or self.positional_relevance is None:
            return self.relevance
        return self.relevance - self.positional.to(self.relevance.dtype)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ images
    def _image_part(self, t: torch.Tensor) -> torch.Tensor:
        return t[0] if self.single and t.shape[0] == 1 else t

    @property
    def image_relevance(self) -> torch.Tensor | None:
        """Pixel relevance summed over channels: ``(H, W)`` for one image, ``(images, H, W)`` for
        several; ``None`` when no image was explained. For an image classifier it equals
        ``relevance``; for a vision-language model it sits beside the token ``relevance``."""
        return None if self.images is None else self._image_part(self.images.relevance)

    @property
    def channel_relevance(self) -> torch.Tensor | None:
        """Pixel relevance per channel, ``(C, H, W)`` (or ``(images, C, H, W)``), or ``None``."""
        return None if self.images is None else self._image_part(self.images.channels)

    def patch_relevance(self, size: int | None = None) -> torch.Tensor:
        """Pixel relevance summed over patches of ``size`` pixels (the model's patch size by
        default): ``(H / size, W / size)`` for one image."""
        if self.images is None:
            raise InputError("this explanation has no image relevance: explain an image input")
        return self._image_part(self.images.patches(size))

    @property
    def relevance_sum(self) -> torch.Tensor:
        """Sum of input relevance per row, ``(batch,)`` (a scalar for one sequence)."""
        dims = tuple(range(1, self.batch_relevance.dim()))
        total = self.batch_relevance.sum(dim=dims)
        return total[0] if self.single else total

    @property
    def conservation(self) -> Conservation:
        """Relevance sum next to the explained logit, and what the rules absorbed (a dict).

        Keys: ``relevance_sum`` (input tokens), ``position_relevance`` (position and token-type
        embeddings, and padding that the model reads, or ``None``), ``target_logit`` and ``absorbed`` = logit - both sums. ``absorbed``
        is not a leak: it is the share the rules give to biases and, under AttnLRP, to the softmax's
        bias term (and the ε stabiliser). The ``conservative-check`` preset (AH-LRP, biases zeroed)
        gives ``absorbed == 0`` up to float error. The repr says so.
        """
        logit = self.target_logit[0] if self.single else self.target_logit
        extra = self.extra_relevance
        if extra is not None and self.single:
            extra = extra[0]
        total = self.relevance_sum + (extra if extra is not None else 0.0)
        decoder = None
        if self.decoder_relevance is not None:
            decoder = self.decoder_relevance.sum(-1)
            decoder = decoder[0] if self.single else decoder
            total = total + decoder
        image = None
        if self.images is not None and self.modality == "tokens":  # a VLM: the images' share
            per_image = self.images.total()
            rows = self.images.rows if self.images.rows is not None else torch.arange(len(per_image))
            image = torch.zeros(len(self)).index_add_(0, rows, per_image.float())
            image = image[0] if self.single else image
            total = total + image
        return Conservation(
            relevance_sum=self.relevance_sum,
            position_relevance=extra,
            **({"decoder_relevance": decoder} if decoder is not None else {}),
            **({"image_relevance": image} if image is not None else {}),
            target_logit=logit,
            absorbed=logit - total,
            rules=self.rules,
            function=any(t.kind == "function" for t in self.targets),
        )

    def __len__(self) -> int:
        return self.batch_relevance.shape[0]

    def __getitem__(self, i: int) -> Explanation:
        """Row ``i`` of a batch as a single explanation."""
        n = len(self)
        if not -n <= i < n:
            from lxt_plus.errors import InputError

            raise InputError(f"row {i} is out of range for an explanation of {n} row(s)")
        sl = slice(i, i + 1) if i >= 0 else slice(n + i, n + i + 1)
        return Explanation(
            batch_relevance=self.batch_relevance[sl],
            tokens=self.tokens[sl],
            token_ids=None if self.token_ids is None else self.token_ids[sl],
            attention_mask=None if self.attention_mask is None else self.attention_mask[sl],
            targets=self.targets[sl],
            target_logit=self.target_logit[sl],
            probability=None if self.probability is None else self.probability[sl],
            rules=self.rules,
            single=True,
            modality=self.modality,
            captures=Captures.from_mapping({k: _slice_capture(v, sl) for k, v in self.captures.items()}),
            extra_relevance=None if self.extra_relevance is None else self.extra_relevance[sl],
            hidden=None if self.hidden is None else self.hidden[sl],
            decoder_relevance=None if self.decoder_relevance is None else self.decoder_relevance[sl],
            decoder_ids=None if self.decoder_ids is None else self.decoder_ids[sl],
            images=None if self.images is None else self.images.of_row(sl.start),
            positional_relevance=None if self.positional_relevance is None else self.positional_relevance[sl],
            positional_layers=None if self.positional_layers is None else self.positional_layers[sl],
            pairs=self.pairs,
        )

    def real_tokens(self, row: int = 0, hide_special: bool = False) -> tuple[list[str], torch.Tensor]:
        """Tokens and relevance of one row with padding removed (and special/chat-template tokens,
        with ``hide_special=True``)."""
        rel = self.batch_relevance[row]
        keep = self._kept(row, hide_special)
        if keep is None:
            return list(self.tokens[row]), rel
        toks = [t for t, k in zip(self.tokens[row], keep.tolist(), strict=True) if k]
        return toks, rel[keep]

    def real_positions(self, row: int = 0, hide_special: bool = False) -> torch.Tensor | None:
        """The positional relevance of the tokens :meth:`real_tokens` keeps, ``None`` without it."""
        if self.positional_relevance is None:
            return None
        keep = self._kept(row, hide_special)
        pos = self.positional_relevance[row]
        return pos if keep is None else pos[keep]

    def _kept(self, row: int, hide_special: bool) -> torch.Tensor | None:
        """The positions of row ``row`` that :meth:`real_tokens` keeps (``None``: all of them)."""
        if self.attention_mask is None:
            return None
        keep = self.attention_mask[row].bool()
        if hide_special and self.hidden is not None:
            keep = keep & ~self.hidden[row]
        return keep

    def top_tokens(self, k: int = 5, row: int = 0, hide_special: bool = False) -> list[tuple[str, float]]:
        """The ``k`` tokens with the largest positive relevance, best first."""
        toks, rel = self.real_tokens(row, hide_special)
        order = torch.argsort(rel, descending=True)[:k].tolist()
        return [(toks[i], float(rel[i])) for i in order]

    def segments(
        self,
        by: str = "sentence",
        row: int = 0,
        spans: Sequence[tuple[int, int]] | None = None,
        passages: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
    ) -> Segments:
        """Relevance summed by segment of one row: ``by="sentence"``, ``"paragraph"`` or
        ``"token"``; or ``spans`` (token ranges ``[start, end)`` of the row without padding); or
        ``passages`` (strings found in the text in order, such as retrieved documents). With spans
        or passages, tokens outside all of them form an ``"(other)"`` segment.
        ``segments(...).top(1)`` is the passage that carried the prediction; ``.to_html()`` and
        ``.to_terminal()`` render them. See :func:`lxt_plus.results.segments.segment_tokens`.
        """
        from lxt_plus.results.segments import segment_tokens

        if self.modality != "tokens":
            raise InputError("segments are for token inputs; this explanation is over " + self.modality)
        toks, rel = self.real_tokens(row)
        return segment_tokens(toks, rel, by=by, spans=spans, passages=passages, names=names)

    # ------------------------------------------------------------ presentation
    def summary(self, row: int = 0, k: int = 3, hide_special: bool = False) -> str:
        """One plain-language sentence: the ``k`` tokens (or image patches) that pushed the
        prediction up most, the ``k`` that pushed it down most, and how much of the logit the
        tokens for it and against it carry. Every renderer shows it under its header."""
        from lxt_plus.render.summary import summary_line

        n = len(self)
        if not -n <= row < n:
            raise InputError(f"row {row} is out of range for an explanation of {n} row(s)")
        return summary_line(self, row % n, k, hide_special=hide_special)

    def words(self, row: int = 0) -> tuple[list[str], torch.Tensor]:
        """Merge sub-word pieces (WordPiece ``##``, byte-level ``Ġ``, SentencePiece ``▁``) into words,
        summing their relevance. Padding is dropped."""
        from lxt_plus.results.words import aggregate_words

        toks, rel = self.real_tokens(row)
        return aggregate_words(toks, rel)

    def to_html(self, **kwargs: Any) -> str:
        """A self-contained HTML heatmap (diverging colours, legend, value on hover)."""
        from lxt_plus.render.html import explanation_html

        return explanation_html(self, **kwargs)

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_terminal(self, **kwargs: Any) -> str:
        """The heatmap as ANSI-coloured text (rich); readable on dark and light terminals.

        ``color=False`` (or ``NO_COLOR`` set) gives plain text: no escape codes, each token followed
        by its normalised relevance. Keywords: see :func:`lxt_plus.render.terminal.explanation_terminal`.
        """
        from lxt_plus.render.terminal import explanation_terminal

        return explanation_terminal(self, **kwargs)

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib figure of the heatmap (tokens, pixels or features)."""
        from lxt_plus.render.mpl import plot_explanation

        return plot_explanation(self, **kwargs)

    def save(self, path: str, **kwargs: Any) -> None:
        """Save as ``.png``/``.pdf``/``.svg`` (matplotlib), ``.html``, ``.json`` or ``.tex``."""
        from lxt_plus.render import save_explanation

        save_explanation(self, path, **kwargs)

    def to_latex(self, **kwargs: Any) -> str:
        """A ``.tex`` snippet (xcolor ``\\colorbox`` per token); needs no LaTeX install."""
        from lxt_plus.render.latex import explanation_latex

        return explanation_latex(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return explanation_to_dict(self)

    def to_json(self, **kwargs: Any) -> str:
        import json

        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Explanation:
        return explanation_from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Explanation:
        import json

        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        rows = len(self)
        tgt = self.targets[0].describe() if rows == 1 else f"{rows} targets"
        shape = tuple(self.relevance.shape)
        text = f"Explanation(rules={self.rules!r}, target={tgt}, relevance shape={shape})"
        if rows == 1:
            c = self[0].conservation
            text += (
                f"\n  relevance sum {float(c['relevance_sum']):.4g} of target logit {float(c['target_logit']):.4g}; "
                f"{float(c['absorbed']):.4g} {WHERE[conservation_kind(self.rules)]} (see .conservation)"
            )
        return text


def _number(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return "[" + ", ".join(f"{v:.4g}" for v in value.detach().float().tolist()) + "]"
    return f"{float(value):.4g}"


_ABSORBED = (
    "absorbed = target_logit - relevance_sum - position_relevance: the share of the logit the rules give "
    "to no input token. It is not a leak. {why} Exact conservation: explain with "
    "rules='conservative-check' (AH-LRP with every bias zeroed; forward values change), where absorbed "
    "is 0 up to float error; `lxt-plus audit` checks it module by module."
)


class Conservation(dict):  # type: ignore[type-arg]
    """:attr:`Explanation.conservation`: a plain dict whose repr explains ``absorbed``."""

    def __init__(self, *, rules: str = "", function: bool = False, **values: Any) -> None:
        super().__init__(**values)
        self.rules = rules
        self.function = function

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_number(v)}" for k, v in self.items())
        why = WHY[conservation_kind(self.rules)]
        if self.function:
            why += (
                " The target is a function of the output: only a function that is linear in the logits "
                "(a margin, a sum over a span) is conserved; what a non-linear one (a log probability) "
                "does not pass on stays here too."
            )
        import textwrap

        return f"Conservation({fields})\n" + textwrap.fill(_ABSORBED.format(why=why), 100)


def _slice_capture(value: Any, sl: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[sl]
    if isinstance(value, dict):
        return {k: _slice_capture(v, sl) for k, v in value.items()}
    return value


@dataclass
class GenerationExplanation:
    """Relevance of every generated token over the prompt and the earlier generated tokens.

    Attributes
    ----------
    tokens:
        All tokens, prompt then generated, length ``n_prompt + n_generated``.
    token_ids:
        ``(n_prompt + n_generated,)`` ids.
    prompt_length:
        Number of prompt tokens.
    matrix:
        ``(n_generated, n_prompt + n_generated)`` signed relevance. Row ``t`` explains generated token
        ``t`` (predicted at position ``prompt_length + t - 1``); columns at or after that token's own
        position are 0 (causality).
    target_logit:
        ``(n_generated,)`` the explained logit of each generated token.
    rules:
        Preset name.
    image_matrix:
        Vision-language models: ``(n_generated, images, H, W)``, row ``t`` the pixel relevance of
        the prompt's images for generated token ``t`` (summed over channels), else ``None``.
    pixels:
        The images the model saw, ``(images, C, H, W)``, for overlays; ``patch_size`` its patch size.
    """

    tokens: list[str]
    token_ids: torch.Tensor
    prompt_length: int
    matrix: torch.Tensor
    target_logit: torch.Tensor
    rules: str
    image_matrix: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    patch_size: int | None = None

    def patch_matrix(self, size: int | None = None) -> torch.Tensor:
        """``image_matrix`` summed over patches of ``size`` pixels (the model's patch size by default):
        ``(n_generated, images, H / size, W / size)``."""
        from lxt_plus.results.images import pool_patches

        if self.image_matrix is None:
            raise InputError("this generation has no image relevance: the prompt had no image")
        size = size or self.patch_size
        if size is None:
            raise InputError("the model has no patch size; pass patch_matrix(size=...) in pixels")
        return pool_patches(self.image_matrix, size)

    @property
    def generated_tokens(self) -> list[str]:
        return self.tokens[self.prompt_length :]

    @property
    def prompt_tokens(self) -> list[str]:
        return self.tokens[: self.prompt_length]

    @property
    def text(self) -> str:
        return "".join(self.generated_tokens)

    def to_html(self, **kwargs: Any) -> str:
        """Interactive HTML: hover a generated token to see its heatmap over the input."""
        from lxt_plus.render.html import generation_html

        return generation_html(self, **kwargs)

    def _repr_html_(self) -> str:
        return self.to_html()

    def to_terminal(self, **kwargs: Any) -> str:
        """Each generated token with its top sources; ``color=False`` for plain text (see
        :func:`lxt_plus.render.terminal.generation_terminal`)."""
        from lxt_plus.render.terminal import generation_terminal

        return generation_terminal(self, **kwargs)

    def plot(self, **kwargs: Any) -> Any:
        from lxt_plus.render.mpl import plot_generation

        return plot_generation(self, **kwargs)

    def save(self, path: str, **kwargs: Any) -> None:
        from lxt_plus.render import save_generation

        save_generation(self, path, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return generation_to_dict(self)

    def __repr__(self) -> str:
        return (
            f"GenerationExplanation(rules={self.rules!r}, prompt={self.prompt_length} tokens, "
            f"generated={len(self.generated_tokens)} tokens)"
        )


def explanation_from_dict(data: dict[str, Any]) -> Explanation:
    """Rebuild an :class:`Explanation` from :func:`~lxt_plus.results.serialize.explanation_to_dict` output.

    Relevance, logits and probabilities come back as float32 tensors, ids and masks as int64, the
    ``hidden`` marks as bool.

    Raises
    ------
    InputError
        If ``data`` is not a serialised explanation or its fields do not fit together.
    """
    fields = explanation_fields(data)
    return Explanation(**{**fields, "targets": [Target(**t) for t in fields["targets"]]})


def generation_from_dict(data: dict[str, Any]) -> GenerationExplanation:
    """Rebuild a :class:`GenerationExplanation` from
    :func:`~lxt_plus.results.serialize.generation_to_dict` output."""
    return GenerationExplanation(**generation_fields(data))
