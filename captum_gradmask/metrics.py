"""Localisation metrics: does an attribution or a mask fall on the ground truth?

Torch-native and batched, one value per sample, on the device of the inputs.
``pointing_game``, ``relevance_mass_accuracy`` and ``relevance_rank_accuracy``
follow Quantus' definitions on the attributions as given (Quantus' default
``abs=False``; its max-normalisation changes none of them): take ``.abs()`` first to
score magnitudes. Ground-truth masks count nonzero entries as inside; a sample with
an empty ground truth scores NaN, as Quantus intends (its ``PointingGame`` 0.6 casts
that NaN to True).
"""

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._validation import check_finite, check_values

_CONV_BY_SPATIAL_DIMS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def pointing_game(attributions: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    r"""1 where a pixel of maximal attribution lies in the mask, else 0 (Zhang et al.
    2018; Quantus ``PointingGame``). Ties: any maximal pixel counts.

    Args:
        attributions (Tensor): float, (N, ...), e.g. (N, 1, H, W).
        masks (Tensor): ground truth shaped like ``attributions``.
        tolerance (float): also a hit when the maximum lies within this Euclidean
            distance, in pixels, of the mask (Zhang et al. use 15); needs
            ``attributions`` shaped (N, C, *spatial) with 1 to 3 spatial dims.
            Default: 0.0

    Returns:
        Tensor: (N,) in the dtype of ``attributions``; NaN for an empty mask.

    Examples::

        >>> pointing_game(saliency.sum(1, keepdim=True), lesion_masks).nanmean()
    """
    _check_attributions_and_masks(attributions, masks)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"tolerance must be a number >= 0, got {tolerance!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    flat_attributions, flat_masks = attributions.flatten(start_dim=1), _flat_bool(masks)
    within_reach = flat_masks
    if tolerance > 0:
        if not 3 <= attributions.dim() <= 5:
            raise ValueError(
                "pointing_game with a tolerance needs attributions shaped (N, C, "
                f"*spatial) with 1 to 3 spatial dims, got {tuple(attributions.shape)}"
            )
        within_reach = _flat_bool(_dilate(masks != 0, tolerance))
    is_maximum = flat_attributions == flat_attributions.amax(dim=1, keepdim=True)
    hit = (is_maximum & within_reach).any(dim=1).to(attributions.dtype)
    return _nan_where_empty(hit, flat_masks)


def relevance_mass_accuracy(attributions: Tensor, masks: Tensor) -> Tensor:
    r"""Sum of the attribution inside the mask over its total sum (Arras et al. 2022;
    Quantus ``RelevanceMassAccuracy``).

    Args:
        attributions (Tensor): float, (N, ...).
        masks (Tensor): ground truth shaped like ``attributions``.

    Returns:
        Tensor: (N,); NaN for an empty mask (and where the total sum is 0).
    """
    _check_attributions_and_masks(attributions, masks)
    flat_attributions, flat_masks = attributions.flatten(start_dim=1), _flat_bool(masks)
    # The ratio does not change with the scale; scaled to max |a| = 1, sums cannot overflow.
    scale = flat_attributions.abs().amax(dim=1, keepdim=True)
    flat_attributions = flat_attributions / torch.where(scale > 0, scale, 1)
    inside = (flat_attributions * flat_masks).sum(dim=1)
    return _nan_where_empty(inside / flat_attributions.sum(dim=1), flat_masks)


def relevance_rank_accuracy(attributions: Tensor, masks: Tensor) -> Tensor:
    r"""Share of the K highest-attributed pixels that lie in the mask, K the mask's
    size (Arras et al. 2022; Quantus ``RelevanceRankAccuracy``).

    Args:
        attributions (Tensor): float, (N, ...).
        masks (Tensor): ground truth shaped like ``attributions``.

    Returns:
        Tensor: (N,) in the dtype of ``attributions``; NaN for an empty mask.
    """
    _check_attributions_and_masks(attributions, masks)
    flat_attributions, flat_masks = attributions.flatten(start_dim=1), _flat_bool(masks)
    ranking = flat_attributions.argsort(dim=1, descending=True)
    hits_within_rank = flat_masks.gather(1, ranking).cumsum(dim=1)
    mask_size = flat_masks.sum(dim=1)
    hits = hits_within_rank.gather(1, (mask_size - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    accuracy = hits.to(attributions.dtype) / mask_size.clamp_min(1)
    return _nan_where_empty(accuracy, flat_masks)


def mask_iou(masks: Tensor, targets: Tensor) -> Tensor:
    r"""Intersection over union of two binary masks per sample.

    Args:
        masks (Tensor): predicted masks (N, ...); nonzero = inside.
        targets (Tensor): ground truth shaped like ``masks``.

    Returns:
        Tensor: (N,) float32; NaN where both masks are empty.
    """
    intersection, total = _overlap(masks, targets)
    return intersection / (total - intersection)


def mask_dice(masks: Tensor, targets: Tensor) -> Tensor:
    r"""Dice coefficient 2|A and B| / (|A| + |B|) of two binary masks per sample.

    Args:
        masks (Tensor): predicted masks (N, ...); nonzero = inside.
        targets (Tensor): ground truth shaped like ``masks``.

    Returns:
        Tensor: (N,) float32; NaN where both masks are empty.
    """
    intersection, total = _overlap(masks, targets)
    return 2 * intersection / total


def _overlap(masks: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """Per sample: pixels inside both masks, and the sum of the two masks' sizes."""
    _check_same_shape(masks, targets, "masks", "targets")
    check_finite(masks, "masks")
    check_finite(targets, "targets")
    flat_masks, flat_targets = _flat_bool(masks), _flat_bool(targets)
    intersection = (flat_masks & flat_targets).sum(dim=1)
    return intersection, flat_masks.sum(dim=1) + flat_targets.sum(dim=1)


def region_recall(masks: Tensor, regions: Tensor, min_coverage: float = 0.5) -> Tensor:
    r"""Share of ground-truth regions found after each unveiling iteration.

    A region counts as found after iteration k when the union of the masks of
    iterations 1..k covers at least ``min_coverage`` of its pixels.

    Args:
        masks (Tensor): (N, K, 1, *spatial), e.g. ``UnveilingResult.masks``; a
            single mask (N, 1, *spatial) as ``masks[:, None]``. Nonzero = inside.
        regions (Tensor): (N, R, 1, *spatial), one ground-truth region per entry
            of dimension 1; empty entries are not counted.
        min_coverage (float): in (0, 1]. Default: 0.5

    Returns:
        Tensor: (N, K) float32; NaN for a sample without regions.

    Examples::

        >>> result = IterativeUnveiling(Saliency(model)).unveil(images, target=1)
        >>> region_recall(result.masks, regions).nanmean(dim=0)   # per iteration
    """
    _check_masks_and_regions(masks, regions)
    flat_masks, flat_regions = _flat_bool(masks, start_dim=2), _flat_bool(regions, start_dim=2)
    if isinstance(min_coverage, bool) or not isinstance(min_coverage, (int, float)):
        raise TypeError(f"min_coverage must be a float in (0, 1], got {min_coverage!r}")
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage!r}")
    found_so_far = (flat_masks.cumsum(dim=1) > 0).float()
    covered = torch.einsum("nkp,nrp->nkr", found_so_far, flat_regions.float())
    region_size = flat_regions.sum(dim=2).unsqueeze(1)
    found = (covered >= min_coverage * region_size) & (region_size > 0)
    n_regions = (region_size > 0).sum(dim=2)
    return found.sum(dim=2) / n_regions


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    r"""Area under the ROC curve: the chance that a random positive outscores a
    random negative, ties counting one half (the Mann-Whitney statistic).

    Args:
        scores (Tensor): (N,) float, higher = more likely positive, e.g. z_1 - z_0.
        labels (Tensor): (N,) 0 / 1 or bool, with both classes present.

    Returns:
        float: in [0, 1]; 0.5 is chance, 0 a perfectly inverted ranking.

    Examples::

        >>> roc_auc(torch.tensor([0.1, 0.9, 0.4]), torch.tensor([0, 1, 1]))
        1.0
    """
    _check_scores_and_labels(scores, labels)
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError(
            "labels must hold at least one positive and one negative example (1 and 0)"
        )
    # Comparisons, not differences: these cannot overflow.
    higher = positives[:, None] > negatives[None, :]
    tied = positives[:, None] == negatives[None, :]
    return (higher.double() + 0.5 * tied.double()).mean().item()


def _check_scores_and_labels(scores: object, labels: object) -> None:
    for name, tensor in (("scores", scores), ("labels", labels)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dtype.is_complex:
            raise TypeError(f"{name} must hold real numbers, got {tensor.dtype}")
    if scores.dim() != 1 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must both have shape (N,), got {tuple(scores.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if labels.device != scores.device:
        raise ValueError(f"labels is on {labels.device} but scores is on {scores.device}")
    check_finite(scores, "scores")
    check_values(lambda: (labels == 0) | (labels == 1), "labels must be bool or hold only 0 and 1")


def _nan_where_empty(values: Tensor, flat_masks: Tensor) -> Tensor:
    return values.masked_fill(~flat_masks.any(dim=1), math.nan)


def _dilate(masks: Tensor, radius: float) -> Tensor:
    """Grow bool (N, C, *spatial) masks by every pixel within ``radius`` (Euclidean)."""
    n_spatial = masks.dim() - 2
    reach = int(math.floor(radius))
    offsets = torch.arange(-reach, reach + 1, device=masks.device, dtype=torch.float32)
    grids = torch.meshgrid(*([offsets] * n_spatial), indexing="ij")
    ball = (sum(g**2 for g in grids) <= radius**2).float()
    channels = masks.reshape(-1, 1, *masks.shape[2:]).float()
    convolve = _CONV_BY_SPATIAL_DIMS[n_spatial]
    grown = convolve(channels, ball[None, None], padding=reach) > 0.5
    return grown.reshape(masks.shape)


def _flat_bool(masks: Tensor, start_dim: int = 1) -> Tensor:
    return masks.flatten(start_dim=start_dim) != 0


def _check_attributions_and_masks(attributions: object, masks: object) -> None:
    if not isinstance(attributions, Tensor) or not attributions.dtype.is_floating_point:
        raise TypeError(
            "attributions must be a floating-point Tensor, got "
            f"{getattr(attributions, 'dtype', type(attributions).__name__)}"
        )
    _check_same_shape(attributions, masks, "attributions", "masks")
    check_finite(attributions, "attributions")
    check_finite(masks, "masks")


def _check_same_shape(first: object, second: object, first_name: str, second_name: str) -> None:
    """Check two non-empty tensors of one shape (N, ...) on one device."""
    for name, tensor in ((first_name, first), (second_name, second)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() < 2 or tensor.numel() == 0:
            raise ValueError(
                f"{name} must be a non-empty batch (N, ...) with at least 2 dims, "
                f"got shape {tuple(tensor.shape)}"
            )
    if first.shape != second.shape:
        raise ValueError(
            f"{second_name} must have the shape of {first_name} {tuple(first.shape)}, "
            f"got {tuple(second.shape)}; reduce channels first, e.g. .sum(1, keepdim=True)"
        )
    if first.device != second.device:
        raise ValueError(
            f"{second_name} is on {second.device} but {first_name} is on {first.device}"
        )


def _check_masks_and_regions(masks: object, regions: object) -> None:
    for name, tensor in (("masks", masks), ("regions", regions)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
        if not 4 <= tensor.dim() <= 6 or tensor.shape[2] != 1 or tensor.numel() == 0:
            raise ValueError(
                f"{name} must be shaped (N, K, 1, *spatial) with 1 to 3 spatial dims, "
                f"got {tuple(tensor.shape)}"
            )
    if masks.shape[0] != regions.shape[0] or masks.shape[2:] != regions.shape[2:]:
        raise ValueError(
            f"regions {tuple(regions.shape)} must match masks {tuple(masks.shape)} in "
            "batch size and in the dims after the second"
        )
    if masks.device != regions.device:
        raise ValueError(f"regions is on {regions.device} but masks is on {masks.device}")
    check_finite(masks, "masks")
    check_finite(regions, "regions")
