"""Mean and spread of any Captum attribution over the sub-networks of an MCDropout."""

import functools
from typing import Callable, Iterator, List, Optional

import torch
from captum.attr import Attribution
from captum.log import log_usage
from torch import Tensor, nn

from captum_gradmask._batching import (
    batch_dependence,
    check_keyword_rows,
    check_per_example_count,
    distribution_keywords,
    regrouped_keywords,
    repeat_examples,
)
from captum_gradmask._compat import _format_additional_forward_args, _is_tuple
from captum_gradmask._state import forward_hooks
from captum_gradmask._validation import (
    check_baselines,
    check_finite_results,
    check_float_inputs,
    check_target_in_range,
)
from captum_gradmask.mc_dropout import MCDropout


class MCAttribution(Attribution):
    r"""Mean (and spread) of an attribution method over the T sub-networks of an
    ``MCDropout`` model.

    The T attributions are computed in batched passes: the inputs are replicated for
    a chunk of samples and each replicated row runs through its own sub-network, so the
    result equals a loop over t (for methods that draw random numbers, one call draws
    for all the sub-networks it covers; ``mc_samples_batch_size=1`` draws as a seeded
    loop would). Any Captum attribution works, including layer and
    neuron methods, ``NoiseTunnel`` (through a factory, see ``attribution_cls``) and
    ``ContrastSaliency``. Methods that compute an example's attribution from the whole
    batch (``FeaturePermutation``; the DeepLift family on a model with ``nn.Softmax``)
    run one sub-network per call, whatever ``mc_samples_batch_size``, so that each
    sees only its own N rows, as it would without MC dropout.

    ``forward_func`` is the mean output over the T sub-networks, callable like the
    model: the function whose attribution the mean attribution is for linear methods
    (and what ``IterativeUnveiling`` scores). ``has_convergence_delta`` and
    ``multiplies_by_inputs`` are those of the wrapped method.

    Args:
        attribution_cls (callable): an attribution class, or any callable that takes a
            forward function first and returns a Captum ``Attribution``, e.g.
            ``lambda forward: NoiseTunnel(Saliency(forward))``.
        mc_model (MCDropout): the sub-networks.
        **attribution_init_kwargs: further arguments of ``attribution_cls``, e.g.
            ``layer=`` for layer methods.

    Examples::

        >>> mc_model = MCDropout(classifier, n_samples=20)
        >>> mean, std = MCAttribution(IntegratedGradients, mc_model).attribute(
        ...     images, target=1, return_std=True, n_steps=50)
    """

    def __init__(
        self,
        attribution_cls: Callable[..., Attribution],
        mc_model: MCDropout,
        **attribution_init_kwargs,
    ) -> None:
        """Arguments: see the class docstring."""
        if not isinstance(mc_model, MCDropout):
            raise TypeError(f"mc_model must be an MCDropout, got {type(mc_model).__name__}")
        super().__init__(_MeanOverSubNetworks(mc_model))
        self.mc_model = mc_model
        self._sub_networks = _SubNetworkForward(mc_model)
        self.attribution_method = attribution_cls(self._sub_networks, **attribution_init_kwargs)
        if not isinstance(self.attribution_method, Attribution):
            raise TypeError(
                "attribution_cls must return a Captum Attribution, got "
                f"{type(self.attribution_method).__name__}"
            )

    def has_convergence_delta(self) -> bool:
        return self.attribution_method.has_convergence_delta()

    @property
    def multiplies_by_inputs(self) -> bool:
        return self.attribution_method.multiplies_by_inputs

    @log_usage()
    def attribute(
        self,
        inputs,
        target=None,
        return_std: bool = False,
        additional_forward_args: Optional[object] = None,
        mc_samples_batch_size: Optional[int] = None,
        **kwargs,
    ):
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): float inputs, batch of N in dimension 0.
            target (int, tuple, Tensor or list, optional): as in Captum; passed to the
                method only when given (neuron methods and ``LayerActivation`` take
                none).
            return_std (bool): also return the standard deviation over the T samples
                (dividing by T). Default: False
            additional_forward_args (Any, optional): passed to the model after the inputs.
            mc_samples_batch_size (int, optional): how many of the T samples one call of
                the attribution method covers (it sees N times that many rows). Default:
                all T at once.
            **kwargs: passed to the attribution method's ``attribute``. Per-example
                values (a Tensor with N rows, a list of N entries; e.g. ``baselines``,
                ``feature_mask``, ``contrast_target``) are replicated with the inputs;
                others, and the baseline distributions of the Shap methods, are passed
                as they are. With ``return_convergence_delta=True`` the delta is the
                mean of the sub-networks' deltas: that of the mean model for methods
                linear in the model (Integrated Gradients, DeepLift).

        Returns:
            The mean attribution, structured as the method returns it (a Tensor, a
            tuple, or a list for several layers), then the standard deviation if
            ``return_std``, then the convergence delta if ``return_convergence_delta``:
            ``mean``, ``(mean, std)``, ``(mean, delta)`` or ``(mean, std, delta)``.
        """
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = check_float_inputs(inputs, forward_func=self.mc_model.model)
        check_baselines(kwargs.get("baselines"), inputs_tuple)
        check_keyword_rows(kwargs, inputs_tuple, distribution_keywords(self.attribution_method, kwargs))
        batch_size = inputs_tuple[0].shape[0]
        check_per_example_count(target, "target", batch_size)
        if batch_dependence(self.attribution_method, self.mc_model.model):
            mc_samples_batch_size = 1
        sample_chunks = self.mc_model.sample_chunks(mc_samples_batch_size)
        inputs_tuple = tuple(x.detach() for x in inputs_tuple)  # caller's graph untouched
        call = _SubNetworkCall(
            self.attribution_method, inputs_tuple, is_inputs_tuple, target,
            _format_additional_forward_args(additional_forward_args) or (), kwargs,
        )

        def check_target_on_outputs(module, args, outputs) -> None:
            check_target_in_range(target, (batch_size, *outputs.shape[1:]))

        chunks = []
        with forward_hooks([(self._sub_networks, check_target_on_outputs)]):
            for samples in sample_chunks:
                with self.mc_model.sampling(samples):
                    chunks.append(call(samples))
        return _summarise(chunks, return_std, bool(kwargs.get("return_convergence_delta")))


class _SubNetworkCall:
    """One call of the attribution method on the inputs replicated for a chunk of
    sub-networks; row c * N + n of its results belongs to sub-network samples[c] and
    example n."""

    def __init__(self, method, inputs_tuple, is_inputs_tuple, target, forward_args, kwargs):
        self.method = method
        self.inputs_tuple = inputs_tuple
        self.is_inputs_tuple = is_inputs_tuple
        self.target = target
        self.forward_args = forward_args
        self.kwargs = kwargs
        self.returns_delta = bool(kwargs.get("return_convergence_delta"))

    def __call__(self, samples: range) -> "_ChunkResult":
        copies, n_examples = len(samples), self.inputs_tuple[0].shape[0]
        device = self.inputs_tuple[0].device
        row_samples = torch.arange(samples.start, samples.stop, device=device).repeat_interleave(n_examples)
        repeat = functools.partial(repeat_examples, copies=copies, n_examples=n_examples)
        # Our own copies: asking for gradients here leaves the caller's flags alone and
        # spares Captum's warning about inputs without gradients.
        rows = tuple(row.requires_grad_() for row in repeat(self.inputs_tuple))
        call_kwargs = regrouped_keywords(self.method, self.kwargs, repeat)
        if self.target is not None:
            call_kwargs["target"] = repeat(self.target)
        result = self.method.attribute(
            rows if self.is_inputs_tuple else rows[0],
            additional_forward_args=(*repeat(self.forward_args), row_samples),
            **call_kwargs,
        )
        attributions, delta = result if self.returns_delta else (result, None)
        return _ChunkResult(attributions, delta, copies, n_examples, type(self.method).__name__)


class _ChunkResult:
    """A chunk's attributions as a flat list of (copies, N, ...) tensors, and how to
    put them back into the method's structure (Tensor, tuple or list, nested)."""

    def __init__(self, attributions, delta, copies, n_examples, method_name):
        self.structure = attributions
        self.leaves = []
        for leaf in _leaves(attributions):
            if leaf.dim() == 0 or leaf.shape[0] != copies * n_examples:
                raise ValueError(
                    f"{method_name}.attribute returned a Tensor of shape "
                    f"{tuple(leaf.shape)}; MCAttribution needs results with the "
                    f"{copies * n_examples} rows of its batch in dimension 0"
                )
            self.leaves.append(leaf.detach().unflatten(0, (copies, n_examples)))
        self.delta = None if delta is None else delta.detach().unflatten(0, (copies, -1))


def _summarise(chunks: List[_ChunkResult], return_std: bool, return_delta: bool):
    per_sample = [torch.cat(parts) for parts in zip(*(chunk.leaves for chunk in chunks))]
    mean = [leaf.mean(0) for leaf in per_sample]
    std = [leaf.std(0, correction=0) for leaf in per_sample] if return_std else []
    check_finite_results(tuple(mean + std), "the attributions")
    structure = chunks[0].structure
    result = [_rebuild(structure, iter(mean))]
    if return_std:
        result.append(_rebuild(structure, iter(std)))
    if return_delta:
        result.append(torch.cat([chunk.delta for chunk in chunks]).mean(0))
    return result[0] if len(result) == 1 else tuple(result)


def _leaves(structure: object) -> Iterator[Tensor]:
    if isinstance(structure, Tensor):
        yield structure
        return
    for item in structure:
        yield from _leaves(item)


def _rebuild(structure: object, leaves: Iterator[Tensor]) -> object:
    if isinstance(structure, Tensor):
        return next(leaves)
    return type(structure)(_rebuild(item, leaves) for item in structure)


class _SubNetworkForward(nn.Module):
    """The model with row r of the batch run through sub-network ``row_samples[r]``,
    given as the last argument (Captum replicates it together with the inputs)."""

    def __init__(self, mc_model: MCDropout) -> None:
        super().__init__()
        self.mc_model = mc_model

    def forward(self, *args: object) -> Tensor:
        *model_args, row_samples = args
        return self.mc_model.run_rows(tuple(model_args), row_samples)


class _MeanOverSubNetworks(nn.Module):
    """The model's output averaged over the T sub-networks; called like the model."""

    def __init__(self, mc_model: MCDropout) -> None:
        super().__init__()
        self.mc_model = mc_model

    def forward(self, inputs: Tensor, *additional_forward_args: object) -> Tensor:
        return self.mc_model(inputs, additional_forward_args=additional_forward_args).mean(0)
