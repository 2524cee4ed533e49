"""Convolution-threshold refinement of saliency maps into region-of-interest masks.

Bordes et al. (MIDL 2018): smooth a saliency map with a box of ones a few times and
threshold it, so scattered gradient pixels become a compact region.
"""

import math

import torch
from torch import Tensor

from captum_gradmask._validation import check_values, is_int

_NORMALIZATIONS = ("max", "p99")
_THRESHOLD_MODES = ("value", "quantile")


def refine_mask(
    attributions: Tensor,
    kernel_size: int = 11,
    n_passes: int = 3,
    threshold: float = 0.5,
    normalize: str = "max",
    threshold_mode: str = "value",
) -> Tensor:
    r"""Turn attribution maps into binary region masks by smoothing and thresholding.

    Per sample: s = max over channels of |a|; s /= max(s); ``n_passes`` times, s =
    the mean over a ``kernel_size``-wide box (square in 2-D, cube in 3-D) with zero
    padding, output the size of the input; s /= max(s); mask = s >= threshold. The
    box means use cumulative sums, so the cost does not grow with ``kernel_size``.

    An all-zero map gives an all-False mask. Half-precision maps are smoothed in
    float32.

    Args:
        attributions (Tensor): float maps shaped (N, C, *spatial) with 1, 2 or 3
            spatial dimensions, e.g. Captum attributions of image inputs. Must be
            finite.
        kernel_size (int): odd width of the box, in pixels. Default: 11
        n_passes (int): number of box means; 0 thresholds the map unsmoothed.
            Default: 3
        threshold (float): in (0, 1]. Default: 0.5
        normalize (str): ``"max"`` (above) or ``"p99"``: first clip |a| at its
            per-sample 99th percentile, so that a few outlier pixels do not dominate.
            Default: ``"max"``
        threshold_mode (str): ``"value"``: keep pixels whose normalised smoothed
            saliency is at least ``threshold``; ``"quantile"``: keep pixels at or
            above the per-sample ``threshold``-quantile of the smoothed saliency
            (about a ``1 - threshold`` share of the pixels), never zero-saliency ones.
            Default: ``"value"``

    Returns:
        Tensor: bool masks shaped (N, 1, *spatial) on the device of ``attributions``.

    Examples::

        >>> attributions = Saliency(model).attribute(images, target=1)   # (8, 3, 224, 224)
        >>> masks = refine_mask(attributions, kernel_size=11, n_passes=3)
        >>> masks.shape, masks.dtype
        (torch.Size([8, 1, 224, 224]), torch.bool)
    """
    check_attribution_maps(attributions)
    check_refine_options(kernel_size, n_passes, threshold, normalize, threshold_mode)
    return refine_mask_checked_options(
        attributions, kernel_size, n_passes, threshold, normalize, threshold_mode
    )


def refine_mask_checked_options(
    attributions: Tensor,
    kernel_size: int,
    n_passes: int,
    threshold: float,
    normalize: str,
    threshold_mode: str,
) -> Tensor:
    """``refine_mask`` for options already checked once (as in a loop); still
    raises ValueError for non-finite attributions."""
    compute_dtype = torch.promote_types(attributions.dtype, torch.float32)
    saliency = attributions.detach().to(compute_dtype).abs()  # a mask has no gradient
    if saliency.shape[1] > 1:  # a max over one channel still costs a full pass
        saliency = saliency.amax(dim=1, keepdim=True)
    if normalize == "p99":
        saliency = torch.minimum(saliency, per_sample_quantile(saliency, 0.99))
    per_sample_max = _per_sample_max(saliency)
    # NaN and inf survive the max, so checking N numbers checks every pixel.
    check_values(
        lambda: torch.isfinite(per_sample_max),
        "attributions contain NaN or infinite values; expected finite maps",
    )
    saliency.div_(torch.where(per_sample_max > 0, per_sample_max, 1))  # abs() made a copy
    saliency = box_mean(saliency, kernel_size, n_passes)
    per_sample_max = _per_sample_max(saliency)
    saliency.div_(torch.where(per_sample_max > 0, per_sample_max, 1))
    if threshold_mode == "quantile":
        return (saliency >= per_sample_quantile(saliency, threshold)) & (saliency > 0)
    return saliency >= threshold


def box_mean(inputs: Tensor, kernel_size: int, n_passes: int = 1) -> Tensor:
    """Mean over a ``kernel_size``-wide box around every pixel of (N, C, *spatial)
    inputs, zero padded, output the input's size; applied ``n_passes`` times.

    The box is separable, and its passes along different axes commute, so all
    passes along one axis run before the next axis: one transpose per axis.
    """
    if n_passes == 0:
        return inputs
    smoothed = inputs
    for axis in range(inputs.dim() - 1, 1, -1):
        along_last = smoothed.movedim(axis, -1).contiguous()
        along_last = _box_sums_along_last_axis(along_last, kernel_size, n_passes)
        smoothed = along_last.div_(kernel_size**n_passes).movedim(-1, axis)
    return smoothed.contiguous()


def _box_sums_along_last_axis(values: Tensor, kernel_size: int, n_passes: int) -> Tensor:
    """``n_passes`` zero-padded box sums along the last axis, by cumulative sums.

    ``running_sum`` holds the cumulative sum of the input padded with radius + 1
    zeros in front and radius behind, so window i sums to running_sum[i + k] -
    running_sum[i]. Two buffers serve every pass: fresh large tensors would cost
    more in page faults than the arithmetic.
    """
    length, radius = values.shape[-1], kernel_size // 2
    running_sum = values.new_zeros(*values.shape[:-1], length + kernel_size)
    over_input = running_sum[..., radius + 1 : radius + 1 + length]
    over_back_padding = running_sum[..., radius + 1 + length :]
    window_sums = torch.empty_like(values)
    for _ in range(n_passes):
        torch.cumsum(values, dim=-1, out=over_input)
        over_back_padding.copy_(over_input[..., -1:].expand_as(over_back_padding))
        torch.sub(running_sum[..., kernel_size:], running_sum[..., :-kernel_size], out=window_sums)
        values = window_sums
    return window_sums


def _per_sample_max(values: Tensor) -> Tensor:
    return values.amax(dim=tuple(range(1, values.dim())), keepdim=True)


def per_sample_quantile(values: Tensor, quantile: float) -> Tensor:
    """The smallest value v of each sample with at least a ``quantile`` share of
    the sample's values <= v (numpy's ``inverted_cdf``), shaped for broadcasting.

    ``kthvalue`` has no size limit, unlike ``torch.quantile``.
    """
    flat = values.flatten(start_dim=1)
    rank = max(1, math.ceil(quantile * flat.shape[1]))
    kth = flat.kthvalue(rank, dim=1).values
    return kth.view(-1, *([1] * (values.dim() - 1)))


def check_attribution_maps(attributions: object, name: str = "attributions") -> None:
    """Check a non-empty (N, C, *spatial) float tensor with 1-3 spatial dims."""
    if not isinstance(attributions, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(attributions).__name__}")
    if not attributions.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {attributions.dtype}")
    if not 3 <= attributions.dim() <= 5:
        raise ValueError(
            f"{name} must be shaped (N, C, *spatial) with 1, 2 or 3 spatial dimensions "
            f"(3 to 5 dimensions in all), got shape {tuple(attributions.shape)}"
        )
    if attributions.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(attributions.shape)}")


def check_refine_options(
    kernel_size: object,
    n_passes: object,
    threshold: object,
    normalize: object,
    threshold_mode: object,
) -> None:
    """Check the refinement options of ``refine_mask``."""
    if not is_int(kernel_size):
        raise TypeError(f"kernel_size must be an int, got {kernel_size!r}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if not is_int(n_passes):
        raise TypeError(f"n_passes must be an int, got {n_passes!r}")
    if n_passes < 0:
        raise ValueError(f"n_passes must be >= 0, got {n_passes}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float in (0, 1], got {threshold!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if normalize not in _NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {_NORMALIZATIONS}, got {normalize!r}")
    if threshold_mode not in _THRESHOLD_MODES:
        raise ValueError(
            f"threshold_mode must be one of {_THRESHOLD_MODES}, got {threshold_mode!r}"
        )
