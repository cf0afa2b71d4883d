"""Captum-compatible LRP: lxt_plus's rules behind Captum's ``attribute()`` API.

Captum's attribution classes, and the libraries built on them (inseq among them), call a
``forward_func`` on input tensors and read ``attribute(inputs, target=..., additional_forward_args=...)``.
:class:`LRP` and :class:`LayerLRP` implement that contract with the LRP rules of a preset: for the
duration of one ``attribute`` call the model is patched (reversibly, as :func:`lxt_plus.patch` does),
one forward and one backward pass run, and relevance comes back as ``input × gradient`` of the
patched model, in the shape of the inputs.

Example (token relevance of a causal LM, from its input embeddings)::

    from lxt_plus.captum import LRP

    def next_token_logits(embeds, attention_mask):
        return model(inputs_embeds=embeds, attention_mask=attention_mask).logits[:, -1]

    lrp = LRP(next_token_logits, model=model, rules="attnlrp")
    embeds = model.get_input_embeddings()(enc.input_ids)
    attr, delta = lrp.attribute(embeds, target=token_id, additional_forward_args=(enc.attention_mask,),
                                return_convergence_delta=True)
    token_relevance = attr.sum(-1)   # (batch, seq): equals lxt_plus.explain(...).relevance

With ``forward_func`` an ``nn.Module`` the model is the forward function itself, as in Captum's own
classes; a HuggingFace model is then called with ``inputs_embeds=`` (``pixel_values`` for image
models) and its ``logits`` are the output.

Captum's own ``captum.attr.LRP`` implements the ε/γ rules for plain networks of Linear and Conv
layers; this class brings lxt_plus's transformer rules (AttnLRP, CP-LRP, ...) to the same API.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from lxt_plus.errors import InputError, MissingDependencyError

try:
    from captum._utils.common import (
        _format_additional_forward_args,
        _format_output,
        _format_tensor_into_tuples,
        _is_tuple,
        _run_forward,
    )
    from captum._utils.gradient import compute_layer_gradients_and_eval
    from captum.attr import GradientAttribution, LayerAttribution
    from captum.log import log_usage
except ImportError as exc:  # pragma: no cover - the test suite installs captum
    raise MissingDependencyError(
        "lxt_plus.captum needs Captum: pip install 'lxt_plus[captum]' (or pip install captum)"
    ) from exc

from lxt_plus.api.explain import explaining
from lxt_plus.engine.detect import is_hf_model
from lxt_plus.engine.functional import acc, input_relevance
from lxt_plus.engine.plan import Preset

__all__ = ["LRP", "LayerLRP"]


def _find_model(forward_func: Callable[..., Any], model: nn.Module | None) -> nn.Module:
    """The module to patch: ``model``, the forward function itself, or the module it is bound to."""
    if model is not None:
        return model
    if isinstance(forward_func, nn.Module):
        return forward_func
    owner = getattr(forward_func, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    inner = getattr(forward_func, "model", None)  # inseq's attribution models hold the HF model here
    if isinstance(inner, nn.Module):
        return inner
    raise InputError(
        f"cannot tell which model {forward_func!r} runs; pass model=... (the nn.Module to patch)"
    )


def _module_forward(model: nn.Module) -> Callable[..., Any]:
    """Captum's convention for a module: call it on the inputs; HF models take embeddings or pixels."""
    if not is_hf_model(model):
        return model

    name = getattr(model, "main_input_name", "input_ids")
    key = "inputs_embeds" if name == "input_ids" else name

    def forward(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        return cast(Tensor, model(**{key: inputs}, **kwargs).logits)

    return forward


class _LxtAttribution:
    """What :class:`LRP` and :class:`LayerLRP` share: the model to patch and the preset."""

    def _init_lrp(
        self,
        forward_func: Callable[..., Any],
        model: nn.Module | None,
        rules: str | Preset | dict[str, Any],
        strict: bool,
    ) -> Callable[..., Any]:
        self.model = _find_model(forward_func, model)
        self.rules = rules
        self.strict = strict
        return _module_forward(forward_func) if isinstance(forward_func, nn.Module) else forward_func

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        with explaining(self.model, self.rules, strict=self.strict), torch.enable_grad():
            yield

    def has_convergence_delta(self) -> bool:
        """LRP conserves relevance: the delta is ``Σ attributions − f(x)[target]`` per example."""
        return True

    @property
    def multiplies_by_inputs(self) -> bool:
        """Relevance is ``input × modified gradient``: it is already multiplied by the inputs."""
        return True


def _delta(attrs: tuple[Tensor, ...], out: Tensor) -> Tensor:
    rows = out.shape[0]
    total = sum(acc(a.detach()).reshape(rows, -1).sum(-1) for a in attrs)
    return cast(Tensor, total) - acc(out.detach()).reshape(rows)


def _selected(out: Any, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise InputError(f"the forward function must return a tensor, got {type(out).__name__}")
    rows = out.shape[0] if out.dim() else 1
    if out.numel() != rows:
        raise InputError(
            f"{what} gives an output of shape {tuple(out.shape)} per batch: pass target= (a class or "
            "token index per example) so that each example has one scalar to explain"
        )
    return out.reshape(rows)


class LRP(_LxtAttribution, GradientAttribution):
    """LRP relevance of the inputs of ``forward_func`` under an lxt_plus preset, via Captum's API.

    Parameters
    ----------
    forward_func:
        The model, or a function of the input tensors (and ``additional_forward_args``) returning
        ``(batch, n_outputs)`` scores (or one scalar per example).
    rules:
        Preset name (``"attnlrp"``, ``"cp-lrp"``, ``"ah-lrp"``, ...), YAML path or
        :class:`~lxt_plus.engine.plan.Preset`.
    model:
        The ``nn.Module`` to patch, when ``forward_func`` is a function. Found automatically when it
        is a bound method of a module or an object with a ``.model`` module (inseq's models).
    strict:
        Refuse models with modules no rule accounts for (see :func:`lxt_plus.patch`).
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        rules: str | Preset | dict[str, Any] = "attnlrp",
        *,
        model: nn.Module | None = None,
        strict: bool = True,
    ) -> None:
        GradientAttribution.__init__(self, self._init_lrp(forward_func, model, rules, strict))

    @log_usage()  # Captum's wrappers (NoiseTunnel) call ``attribute.__wrapped__``
    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
    ) -> Any:
        """Relevance of ``inputs`` for ``forward_func(inputs, *additional_forward_args)[target]``.

        Parameters
        ----------
        inputs:
            A tensor or a tuple of tensors, batch first (for language models: input embeddings).
        target:
            Captum's target: an output index for all examples, a list or tensor with one per example,
            or tuples for outputs of more than two dimensions; ``None`` when the forward function
            returns one scalar per example.
        additional_forward_args:
            Further arguments of ``forward_func`` (attention masks, ...), not attributed.
        return_convergence_delta:
            Also return ``Σ relevance − output`` per example (0 up to the rules' absorption).

        Returns
        -------
        Tensor or tuple of Tensor (and a delta ``(batch,)``)
            Relevance in the shape of each input.
        """
        is_tuple = _is_tuple(inputs)
        formatted = _format_tensor_into_tuples(inputs)
        extra = _format_additional_forward_args(additional_forward_args)
        with self._patched(), input_relevance() as exact:
            leaves = tuple(x.detach().requires_grad_(True) for x in formatted)
            out = _selected(_run_forward(self.forward_func, leaves, target, extra), "the forward function")
            grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        attrs = []
        for x, g in zip(leaves, grads, strict=True):
            rel = acc(x.detach()) * acc(g) if g is not None else torch.zeros_like(acc(x.detach()))
            for correction in exact.get(id(x), []):  # rules with constant input terms (z^B, flat)
                rel = rel + correction
            attrs.append(rel.to(x.dtype))
        result = _format_output(is_tuple, tuple(attrs))
        return (result, _delta(tuple(attrs), out)) if return_convergence_delta else result


class LayerLRP(_LxtAttribution, LayerAttribution, GradientAttribution):
    """LRP relevance at the output (or input) of ``layer``, as Captum's layer attributions give it.

    The usual use is token relevance from ``input_ids``: ``layer`` is the embedding module, and the
    relevance of each token is the relevance of its embedding, summed over the hidden dimension.

    Parameters
    ----------
    forward_func:
        The model, or a function of the inputs returning per-example scores.
    layer:
        The module whose output (``attribute_to_layer_input=False``) or input is attributed.
    rules:
        Preset name, YAML path or :class:`~lxt_plus.engine.plan.Preset`.
    model:
        The ``nn.Module`` to patch, when ``forward_func`` is a function (see :class:`LRP`).
    strict:
        Refuse models with modules no rule accounts for.
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: nn.Module,
        rules: str | Preset | dict[str, Any] = "attnlrp",
        *,
        model: nn.Module | None = None,
        strict: bool = True,
    ) -> None:
        if isinstance(forward_func, nn.Module) and is_hf_model(forward_func):
            hf = forward_func

            def forward(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
                return cast(Tensor, hf(input_ids=input_ids, attention_mask=attention_mask).logits)

            model, forward_func = hf, forward
        func = self._init_lrp(forward_func, model, rules, strict)
        LayerAttribution.__init__(self, func, layer)
        GradientAttribution.__init__(self, func)

    @log_usage()  # Captum's wrappers (NoiseTunnel) call ``attribute.__wrapped__``
    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: Any = None,
        additional_forward_args: Any = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
    ) -> Any:
        """Relevance of the layer's output (or input) for ``forward_func(inputs, ...)[target]``.

        Parameters
        ----------
        inputs:
            The forward function's inputs (for example ``input_ids``), batch first.
        target:
            Captum's target (see :meth:`LRP.attribute`).
        additional_forward_args:
            Further arguments of ``forward_func``.
        return_convergence_delta:
            Also return ``Σ relevance − output`` per example.
        attribute_to_layer_input:
            Attribute the layer's input instead of its output.

        Returns
        -------
        Tensor or tuple of Tensor (and a delta ``(batch,)``)
            Relevance in the shape of the layer's output (or input).
        """
        formatted = _format_tensor_into_tuples(inputs)
        extra = _format_additional_forward_args(additional_forward_args)
        with self._patched():
            grads, evals = compute_layer_gradients_and_eval(
                self.forward_func,
                self.layer,
                formatted,
                target,
                extra,
                attribute_to_layer_input=attribute_to_layer_input,
            )
            attrs = tuple((acc(e.detach()) * acc(g)).to(e.dtype) for e, g in zip(evals, grads, strict=True))
            result = _format_output(len(attrs) > 1, attrs)
            if not return_convergence_delta:
                return result
            with torch.no_grad():  # Captum's layer gradients do not return the output: one more forward
                out = _run_forward(self.forward_func, formatted, target, extra)
        return result, _delta(attrs, _selected(out, "the forward function"))
