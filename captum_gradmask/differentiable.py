"""Captum gradient attributions whose outputs carry gradients to the parameters."""

import copy
import functools
import inspect
from typing import Callable, Optional, Tuple, TypeVar

import torch
from captum.attr import (
    Attribution,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    LayerGradientXActivation,
    Saliency,
)
from torch import Tensor

from captum_gradmask._compat import _format_tensor_into_tuples, _run_forward
from captum_gradmask._state import preserved_requires_grad
from captum_gradmask._validation import (
    check_baselines,
    check_finite_results,
    check_float_inputs,
)
from captum_gradmask.contrast_saliency import ContrastSaliency

AttributionT = TypeVar("AttributionT", bound=Attribution)

# Methods that take their input gradients from ``self.gradient_func``.
_GRADIENT_FUNC_METHODS = (Saliency, InputXGradient, IntegratedGradients, ContrastSaliency)
# Layer methods that pass ``grad_kwargs`` on to ``torch.autograd.grad``.
# LayerIntegratedGradients is left out: it evaluates the layer activations without
# a graph, so parameters before the layer would silently get zero gradient.
_GRAD_KWARGS_METHODS = (LayerGradCam, LayerGradientXActivation)


def gradients_with_graph(
    forward_fn: Callable[..., Tensor],
    inputs: Tuple[Tensor, ...],
    target_ind: object = None,
    additional_forward_args: Optional[object] = None,
) -> Tuple[Tensor, ...]:
    """Captum's ``compute_gradients`` with ``create_graph=True``: the gradients can
    themselves be differentiated with respect to the model parameters."""
    with torch.enable_grad():
        outputs = _run_forward(forward_fn, inputs, target_ind, additional_forward_args)
        if outputs[0].numel() != 1:
            raise ValueError(
                "target must select one output per example; the selected output has "
                f"shape {tuple(outputs.shape)}"
            )
        return torch.autograd.grad(torch.unbind(outputs), inputs, create_graph=True)


def differentiable(attribution: AttributionT) -> AttributionT:
    """Return a copy of a Captum gradient attribution whose outputs are differentiable.

    Captum computes attributions without ``create_graph``, so they cannot sit in a
    training loss. The copy computes the same values but keeps the graph, so a loss
    on the attributions back-propagates to the model's parameters (double backprop).
    The original object is not changed.

    Supported: ``Saliency``, ``InputXGradient``, ``IntegratedGradients`` and
    ``ContrastSaliency``, and the layer methods ``LayerGradCam`` and
    ``LayerGradientXActivation`` (through their ``grad_kwargs``). ``internal_batch_size``
    is refused: Captum detaches every chunk after the first. The copy also runs inside
    ``NoiseTunnel``, with the same values, but NoiseTunnel averages under ``no_grad``,
    so that average carries no graph.

    Args:
        attribution (Attribution): one of the supported Captum attributions.

    Returns:
        A copy of ``attribution``, same class, whose ``attribute`` keeps the graph.

    Raises:
        TypeError: for any other method, e.g. those whose backward hooks replace
            gradients (GuidedBackprop, DeepLift, LRP), that run under ``no_grad``
            (NoiseTunnel, perturbation methods) or that detach activations
            (LayerIntegratedGradients).

    Examples::

        >>> saliency = differentiable(Saliency(model))
        >>> grads = saliency.attribute(x, target=1, abs=False)
        >>> penalty = (grads * (1 - lesion_mask)).pow(2).sum()
        >>> (loss + penalty).backward()   # reaches model parameters through grads
    """
    method = type(attribution)
    if method not in _GRADIENT_FUNC_METHODS + _GRAD_KWARGS_METHODS:
        supported = ", ".join(m.__name__ for m in _GRADIENT_FUNC_METHODS + _GRAD_KWARGS_METHODS)
        raise TypeError(
            f"differentiable() cannot make {method.__name__} differentiable: it keeps "
            f"no graph to the model parameters. Supported methods: {supported}"
        )
    differentiable_copy = copy.copy(attribution)
    if method in _GRADIENT_FUNC_METHODS:
        differentiable_copy.gradient_func = gradients_with_graph
    differentiable_copy.attribute = _attribute_keeping_graph(
        differentiable_copy.attribute,
        pass_grad_kwargs=method in _GRAD_KWARGS_METHODS,
        input_gradient_of=attribution.forward_func if method in _GRADIENT_FUNC_METHODS else None,
    )
    return differentiable_copy


def _attribute_keeping_graph(
    plain_attribute: Callable, pass_grad_kwargs: bool, input_gradient_of: Optional[Callable]
) -> Callable:
    """Wrap ``attribute`` to keep the graph. ``input_gradient_of``: the forward
    function of an input-gradient method, whose inputs and baselines must then be
    finite float tensors on its device (layer methods may take other inputs)."""
    signature = inspect.signature(plain_attribute)

    @functools.wraps(plain_attribute)
    def attribute(*args: object, **kwargs: object):
        arguments = signature.bind(*args, **kwargs).arguments
        if arguments.get("internal_batch_size") is not None:
            raise ValueError(
                "internal_batch_size is not supported by differentiable(): Captum "
                "detaches every internal batch after the first, which would cut the "
                "graph; leave it None"
            )
        if pass_grad_kwargs:
            kwargs["grad_kwargs"] = {**(kwargs.get("grad_kwargs") or {}), "create_graph": True}
        inputs = arguments.get("inputs", ())
        if input_gradient_of is not None:
            inputs_tuple = check_float_inputs(inputs, forward_func=input_gradient_of)
            check_baselines(arguments.get("baselines"), inputs_tuple)
        with preserved_requires_grad(_format_tensor_into_tuples(inputs)):
            attributions = plain_attribute(*args, **kwargs)
        check_finite_results(_format_tensor_into_tuples(attributions), "the attributions")
        return attributions

    # Captum's wrappers call ``method.attribute.__wrapped__(method, ...)`` (the function
    # under ``log_usage``); ``functools.wraps`` left the bound method there.
    def attribute_called_with_self(_method: object, *args: object, **kwargs: object):
        return attribute(*args, **kwargs)

    attribute.__wrapped__ = attribute_called_with_self
    return attribute
