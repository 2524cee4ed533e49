"""Iterative unveiling: hide the region an attribution found and ask again."""

import functools
import inspect
import math
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from captum.attr import Attribution, LayerAttribution
from captum.log import log_usage
from torch import Tensor
from tqdm.auto import tqdm

from captum_gradmask._batching import (
    batch_dependence,
    regrouped_keywords,
    select_examples,
    wrapper_chain,
)
from captum_gradmask._compat import _format_output, _is_tuple, _run_forward, _select_targets
from captum_gradmask._state import evaluation_mode, forward_hooks
from captum_gradmask._validation import (
    check_batch_size,
    check_finite,
    check_finite_results,
    check_model_device,
    check_target_in_range,
)
from captum_gradmask.refine import (
    box_mean,
    check_refine_options,
    refine_mask_checked_options,
)

FillType = Union[int, float, Tensor, str]
_INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_BLUR_PASSES = 3


class UnveilingResult(NamedTuple):
    """What ``IterativeUnveiling.unveil`` found, K = ``n_iter``.

    Attributes:
        masks (Tensor): bool (N, K, 1, *spatial); ``masks[:, k]`` is the region newly
            found at iteration k + 1. Regions of one sample are disjoint; all False
            once the sample has stopped.
        attributions (Tensor): (N, K, C', *spatial); the map refined at iteration
            k + 1 (C' its channels; layer maps upsampled to the input), with
            already-hidden pixels zeroed; zero after the sample stopped.
        scores (Tensor): (N, K + 1); the target output on the input, then after
            each iteration's hiding. A stopped sample repeats its last score.
        order (Tensor): long (N, 1, *spatial); 0 where never found, k where found
            at iteration k.
        n_found (Tensor): long (N,); the number of iterations that found a region.
    """

    masks: Tensor
    attributions: Tensor
    scores: Tensor
    order: Tensor
    n_found: Tensor


class IterativeUnveiling(Attribution):
    r"""Reveal the regions a model uses beyond the most salient one (Bordes et al.).

    Each iteration attributes the current input with the wrapped method, zeroes the
    attribution of pixels already hidden, refines it into a region mask with
    :func:`~captum_gradmask.refine.refine_mask`, hides the new region by replacing it
    with ``fill`` and records the target score. A sample stops when an iteration
    finds nothing new; it stays in the batch, with its results frozen, so per-sample
    targets and ``additional_forward_args`` keep their layout. Hidden pixels are
    never selected again.

    The model runs in eval mode while unveiling, as MONAI's visualisation tools do:
    dropout would randomise the maps and BatchNorm in training mode would update its
    statistics at every pass. Every module's mode is restored afterwards, also after
    an exception (a forward function that is not a module has each module switched
    as it first runs).

    Args:
        attribution_method (Attribution): any Captum attribution of image inputs
            whose output is an (N, C', *spatial) map: shaped like the input
            (``Saliency(model)``, ``NoiseTunnel(GuidedBackprop(model))``,
            ``IntegratedGradients(model)``, ``ContrastSaliency(model)``,
            ``MCAttribution(...)``) or a layer map (``LayerGradCam``), which is
            upsampled to the input with ``LayerAttribution.interpolate``
            (linear / bilinear / trilinear). Any number of channels: refinement
            takes the maximum over channels. It is not changed.

    Examples::

        >>> unveiling = IterativeUnveiling(NoiseTunnel(GuidedBackprop(model)))
        >>> result = unveiling.unveil(images, target=1, n_iter=5, nt_samples=10)
        >>> result.masks.shape            # (N, 5, 1, H, W) bool
        >>> first_found = unveiling.attribute(images, target=1)   # shaped like images
        >>> ig = IterativeUnveiling(IntegratedGradients(model))
        >>> ig.unveil(images, target=1, fill="blur", baselines=blurred_images)
    """

    def __init__(self, attribution_method: Attribution) -> None:
        """Arguments: see the class docstring."""
        if not isinstance(attribution_method, Attribution):
            raise TypeError(
                "attribution_method must be a Captum Attribution, got "
                f"{type(attribution_method).__name__}"
            )
        self.attribution_method = attribution_method
        super().__init__(attribution_method.forward_func)

    @log_usage()
    def attribute(
        self,
        inputs: Union[Tensor, tuple],
        target: object = None,
        n_iter: int = 5,
        fill: FillType = 0.0,
        kernel_size: int = 11,
        n_passes: int = 3,
        threshold: float = 0.5,
        normalize: str = "max",
        threshold_mode: str = "value",
        additional_forward_args: Optional[object] = None,
        examples_batch_size: Optional[int] = None,
        show_progress: bool = False,
        **attribute_kwargs: object,
    ) -> Union[Tensor, tuple]:
        r"""Unveil and return how early each pixel was found, shaped like ``inputs``.

        A pixel found at iteration k gets ``(n_iter + 1 - k) / n_iter`` in every
        channel (1 for the first region, 1 / n_iter for the last), a pixel never
        found gets 0. Arguments as in :meth:`unveil`.

        Returns:
            Tensor or tuple[Tensor]: as ``inputs``, in their dtype.
        """
        result = self.unveil(
            inputs,
            target=target,
            n_iter=n_iter,
            fill=fill,
            kernel_size=kernel_size,
            n_passes=n_passes,
            threshold=threshold,
            normalize=normalize,
            threshold_mode=threshold_mode,
            additional_forward_args=additional_forward_args,
            examples_batch_size=examples_batch_size,
            show_progress=show_progress,
            **attribute_kwargs,
        )
        image = _single_image(inputs)
        earliness = (n_iter + 1 - result.order).to(image.dtype) / n_iter
        earliness = torch.where(result.order > 0, earliness, 0)
        return _format_output(_is_tuple(inputs), (earliness.expand_as(image).contiguous(),))

    def unveil(
        self,
        inputs: Union[Tensor, tuple],
        target: object = None,
        n_iter: int = 5,
        fill: FillType = 0.0,
        kernel_size: int = 11,
        n_passes: int = 3,
        threshold: float = 0.5,
        normalize: str = "max",
        threshold_mode: str = "value",
        additional_forward_args: Optional[object] = None,
        examples_batch_size: Optional[int] = None,
        show_progress: bool = False,
        **attribute_kwargs: object,
    ) -> UnveilingResult:
        r"""Run the unveiling iterations and return every step.

        Args:
            inputs (Tensor or tuple[Tensor]): one float image batch (N, C, *spatial),
                1 to 3 spatial dimensions. Pass other model inputs through
                ``additional_forward_args``.
            target (int, tuple, Tensor or list, optional): the output explained and
                scored, in any form Captum accepts; it must select one value per
                example. Default: None
            n_iter (int): number of iterations K. Default: 5
            fill (float, Tensor or str): what hidden pixels become: a number; a
                tensor shaped like ``inputs`` or (1, C, *spatial); ``"mean"``, each
                sample's per-channel mean; or ``"blur"``, the input box-blurred 3 times
                with ``kernel_size`` (edge-corrected). Default: 0.0
            kernel_size, n_passes, threshold, normalize, threshold_mode: refinement
                options, see :func:`~captum_gradmask.refine.refine_mask`.
            additional_forward_args (Any, optional): passed to the model after the
                inputs, both by the wrapped method and when scoring.
            examples_batch_size (int, optional): unveil this many examples at a
                time, so peak memory stays that of a batch this size; results are
                the same up to float rounding (methods that draw random numbers,
                such as NoiseTunnel and GradientShap, draw per chunk). Per-example
                values (a Tensor with N rows, a list of N entries) in ``target``,
                ``fill``, ``additional_forward_args`` and ``attribute_kwargs`` are
                split with the inputs; the baseline
                distributions of the Shap methods are not. Refused for methods that
                compute an example's attribution from the whole batch
                (``FeaturePermutation``; DeepLift on a model with ``nn.Softmax``).
                Default: None (all N at once)
            show_progress (bool): show a tqdm progress bar over iterations.
                Default: False
            **attribute_kwargs: passed to the wrapped method's ``attribute``
                unchanged, e.g. ``baselines`` and ``n_steps`` for IntegratedGradients,
                ``nt_samples`` for NoiseTunnel. ``return_convergence_delta`` is
                refused: unveiling uses the map only.

        Returns:
            UnveilingResult: masks, attributions, scores, order map and per-sample
            number of regions found; see :class:`UnveilingResult`.
        """
        image = _single_image(inputs)
        check_model_device(self.forward_func, image)
        check_finite(image, "inputs")
        _check_n_iter(n_iter)
        check_refine_options(kernel_size, n_passes, threshold, normalize, threshold_mode)
        n_examples = image.shape[0]
        chunk_size = check_batch_size(examples_batch_size, "examples_batch_size", n_examples)
        self._check_method_options(attribute_kwargs, chunk_size < n_examples)
        fill_values = _fill_tensor(fill, image, kernel_size)
        refine_options = (kernel_size, n_passes, threshold, normalize, threshold_mode)

        image = image.detach()  # an alias: the caller's tensor is never handed out
        chunks = [slice(start, start + chunk_size) for start in range(0, n_examples, chunk_size)]
        results = []
        progress = tqdm(total=n_iter * len(chunks), desc="Unveiling", disable=not show_progress)
        with progress, evaluation_mode(self.forward_func):
            for rows in chunks:
                select = functools.partial(select_examples, rows=rows, n_examples=n_examples)
                results.append(
                    self._unveil_examples(
                        image[rows],
                        select(target),
                        select(fill_values),
                        select(additional_forward_args),
                        regrouped_keywords(self.attribution_method, attribute_kwargs, select),
                        n_iter,
                        refine_options,
                        progress,
                    )
                )
        return UnveilingResult(*(torch.cat(parts) for parts in zip(*results)))

    def _unveil_examples(
        self,
        image: Tensor,
        target: object,
        fill_values: Tensor,
        additional_forward_args: Optional[object],
        attribute_kwargs: dict,
        n_iter: int,
        refine_options: tuple,
        progress_bar: tqdm,
    ) -> UnveilingResult:
        """The unveiling iterations on one batch of examples, all arguments checked.

        Every iteration runs, also after all samples stopped: checking whether any
        sample is still active would make the host wait for the device. A stopped
        sample is rare (its map must be zero everywhere not yet hidden) and finds
        nothing more.
        """
        spatial_ones = (1,) * (image.dim() - 2)
        hidden = torch.zeros_like(image[:, :1], dtype=torch.bool)
        active = torch.ones(image.shape[0], dtype=torch.bool, device=image.device)
        current = _fresh_leaf(image)
        # Scored before the wrapped method runs, so a bad target fails with our message;
        # checked once, as every later pass has the same output shape.
        scores = [self._score(current, target, additional_forward_args, check_target=True)]
        masks: List[Tensor] = []
        attributions: List[Tensor] = []
        for iteration in range(n_iter):
            attribution, outputs = self._attribute_keeping_outputs(
                current, target, additional_forward_args, attribute_kwargs
            )
            if iteration > 0:
                scores.append(self._score(current, target, additional_forward_args, outputs))
            stopped = ~active.view(-1, 1, *spatial_ones)
            # A zero map refines to an empty mask, so stopped samples find nothing.
            attribution = attribution.masked_fill(hidden | stopped, 0)
            new_region = refine_mask_checked_options(attribution, *refine_options) & ~hidden
            active = new_region.flatten(start_dim=1).any(dim=1)
            hidden = hidden | new_region
            current = _fresh_leaf(torch.where(hidden, fill_values, image))
            masks.append(new_region)
            attributions.append(attribution)
            progress_bar.update()
        scores.append(self._score(current, target, additional_forward_args))
        return _collect_result(masks, attributions, scores)

    def _attribute_keeping_outputs(
        self,
        inputs: Tensor,
        target: object,
        additional_forward_args: Optional[object],
        attribute_kwargs: dict,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The wrapped method's attribution of ``inputs``, and the model outputs at
        ``inputs`` if the method computed them.

        Methods that run the model on the inputs as they are (Saliency,
        GuidedBackprop, ContrastSaliency) compute the outputs the score needs: a
        forward hook keeps them, which saves one forward pass per iteration. Others
        (noisy or scaled inputs, a forward function that is not a module) give None.
        """
        if additional_forward_args is not None:
            attribute_kwargs = {
                **attribute_kwargs, "additional_forward_args": additional_forward_args
            }
        outputs_at_inputs: List[Tensor] = []

        def keep_outputs_at_inputs(module, args, outputs) -> None:
            if not outputs_at_inputs and args and args[0] is inputs:
                outputs_at_inputs.append(outputs.detach())

        is_module = isinstance(self.forward_func, torch.nn.Module)
        with forward_hooks([(self.forward_func, keep_outputs_at_inputs)] if is_module else []):
            attribution = self._attribute(inputs, target, attribute_kwargs)
        return attribution, (outputs_at_inputs[0] if outputs_at_inputs else None)

    def _attribute(self, inputs: Tensor, target: object, attribute_kwargs: dict) -> Tensor:
        """The wrapped method's map of ``inputs``, detached; a layer map (other spatial
        size) upsampled to the input. Methods without a ``target`` (neuron methods,
        LayerActivation) get none: the target is then only scored."""
        if _takes_target(self.attribution_method):
            attribute_kwargs = {**attribute_kwargs, "target": target}
        attribution = self.attribution_method.attribute(inputs, **attribute_kwargs)
        if (
            not isinstance(attribution, Tensor)
            or attribution.dim() != inputs.dim()
            or attribution.shape[0] != inputs.shape[0]
        ):
            received = getattr(attribution, "shape", type(attribution).__name__)
            raise ValueError(
                f"{type(self.attribution_method).__name__}.attribute must return one "
                f"Tensor (N, C', *spatial) with the {inputs.shape[0]} examples and the "
                f"{inputs.dim() - 2} spatial dimensions of the inputs, got {received}"
            )
        spatial_size = tuple(inputs.shape[2:])
        if tuple(attribution.shape[2:]) != spatial_size:
            mode = _INTERPOLATION_MODES[len(spatial_size)]
            attribution = LayerAttribution.interpolate(attribution, spatial_size, mode)
        return attribution.detach()

    def _check_method_options(self, attribute_kwargs: dict, examples_split: bool) -> None:
        method_name = type(self.attribution_method).__name__
        if attribute_kwargs.get("return_convergence_delta"):
            raise ValueError(
                "return_convergence_delta=True is not supported: unveiling refines the "
                f"map of {method_name} and has no use for its delta; leave it False"
            )
        dependence = batch_dependence(self.attribution_method, self.forward_func)
        if examples_split and dependence:
            raise ValueError(
                f"examples_batch_size would change the results of {method_name}: "
                f"{dependence}. Leave examples_batch_size None"
            )

    def _score(
        self,
        inputs: Tensor,
        target: object,
        additional_forward_args: Optional[object],
        outputs: Optional[Tensor] = None,
        check_target: bool = False,
    ) -> Tensor:
        """The target output at ``inputs``, from ``outputs`` if given, else a forward pass."""
        if outputs is None:
            with torch.no_grad():
                outputs = _run_forward(self.forward_func, inputs, None, additional_forward_args)
        if check_target:
            check_target_in_range(target, outputs.shape)
        selected = _select_targets(outputs, target)
        if selected.numel() != inputs.shape[0]:
            raise ValueError(
                "target must select one model output per example to record scores; "
                f"the selection has shape {tuple(selected.shape)} for "
                f"{inputs.shape[0]} examples"
            )
        check_finite_results((selected,), "the target scores")
        return selected.reshape(-1)


def _takes_target(attribution_method: Attribution) -> bool:
    """Whether the innermost method (inside NoiseTunnel, MCAttribution) takes a target."""
    innermost = wrapper_chain(attribution_method)[-1]
    parameters = inspect.signature(innermost.attribute).parameters
    return "target" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values())


def _collect_result(
    masks: List[Tensor], attributions: List[Tensor], scores: List[Tensor]
) -> UnveilingResult:
    """Stack the per-iteration lists into an UnveilingResult."""
    stacked_masks = torch.stack(masks, dim=1)
    n_iter = stacked_masks.shape[1]
    iteration = torch.arange(1, n_iter + 1, device=stacked_masks.device)
    iteration = iteration.view(1, n_iter, *([1] * (stacked_masks.dim() - 2)))
    order = (stacked_masks * iteration).sum(dim=1)  # regions are disjoint
    return UnveilingResult(
        masks=stacked_masks,
        attributions=torch.stack(attributions, dim=1),
        scores=torch.stack(scores, dim=1),
        order=order,
        n_found=stacked_masks.flatten(start_dim=2).any(dim=2).sum(dim=1),
    )


def _fresh_leaf(inputs: Tensor) -> Tensor:
    # Gradient methods need requires_grad and warn when they have to set it; this
    # tensor is ours, so set it here.
    return inputs.detach().requires_grad_()


def _single_image(inputs: object) -> Tensor:
    """The image batch from a Tensor or a one-element tuple, after checks."""
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise ValueError(
                f"inputs must be one image batch; got a tuple of {len(inputs)}. Pass "
                "the other model inputs through additional_forward_args"
            )
        (inputs,) = inputs
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a Tensor, got {type(inputs).__name__}")
    if not inputs.dtype.is_floating_point:
        raise TypeError(f"inputs must have a floating-point dtype, got {inputs.dtype}")
    if not 3 <= inputs.dim() <= 5 or inputs.numel() == 0:
        raise ValueError(
            "inputs must be a non-empty batch shaped (N, C, *spatial) with 1 to 3 "
            f"spatial dimensions, got shape {tuple(inputs.shape)}"
        )
    return inputs


def _check_n_iter(n_iter: object) -> None:
    if not isinstance(n_iter, int) or isinstance(n_iter, bool):
        raise TypeError(f"n_iter must be an int, got {n_iter!r}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")


def _fill_tensor(fill: object, image: Tensor, kernel_size: int) -> Tensor:
    """The fill values for hidden pixels, broadcastable against ``image``."""
    if isinstance(fill, str):
        if fill == "mean":
            return image.mean(dim=tuple(range(2, image.dim())), keepdim=True).detach()
        if fill == "blur":
            blurred = box_mean(image.detach(), kernel_size, _BLUR_PASSES)
            coverage = box_mean(torch.ones_like(image[:1, :1]), kernel_size, _BLUR_PASSES)
            return blurred / coverage
        raise ValueError(f'fill as a string must be "mean" or "blur", got {fill!r}')
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        if not math.isfinite(fill):
            raise ValueError(f"fill must be finite, got {fill}")
        return torch.tensor(fill, device=image.device, dtype=image.dtype)
    if isinstance(fill, Tensor):
        batch_shape, single_shape = image.shape, (1, *image.shape[1:])
        if fill.shape not in (batch_shape, single_shape):
            raise ValueError(
                f"fill must be shaped like inputs {tuple(batch_shape)} or "
                f"{single_shape}, got {tuple(fill.shape)}"
            )
        if fill.dtype != image.dtype or fill.device != image.device:
            raise ValueError(
                f"fill must match inputs in dtype and device ({image.dtype}, "
                f"{image.device}), got ({fill.dtype}, {fill.device})"
            )
        check_finite(fill, "fill")
        return fill.detach()
    raise TypeError(
        'fill must be a number, a Tensor, "mean" or "blur", got '
        f"{type(fill).__name__}"
    )
