"""Predictive uncertainty over Monte-Carlo samples: entropies in log space."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._validation import check_values


class Uncertainty(NamedTuple):
    """Predictive uncertainty over T Monte-Carlo samples (entropies in nats).

    For softmax outputs (N, C, *spatial) the class dimension is reduced: ``mean`` is
    (N, C, *spatial), the other fields (N, *spatial). For sigmoid outputs every output
    is its own binary variable: all fields have the output's shape and ``mean`` is the
    probability of the positive class.
    """

    mean: Tensor  #: pbar = mean over t of p_t
    predictive_entropy: Tensor  #: total uncertainty H[pbar]
    expected_entropy: Tensor  #: aleatoric part E_t H[p_t]
    mutual_information: Tensor  #: epistemic part H[pbar] - E_t H[p_t] >= 0
    variation_ratio: Tensor  #: 1 - (votes for the most voted class) / T


def predictive_uncertainty(probs: Tensor) -> Uncertainty:
    r"""Uncertainty of stacked class probabilities from T stochastic forward passes.

    Args:
        probs (Tensor): probabilities of shape (T, N, C, *spatial) that sum to one over
            the class dimension 2. For binary sigmoid outputs p, stack ``1 - p`` and
            ``p`` in dimension 2.

    Returns:
        Uncertainty: ``mean`` (N, C, *spatial); the entropies, mutual information and
        variation ratio (N, *spatial).

    Examples::

        >>> probs = torch.softmax(torch.randn(20, 4, 3), dim=2)   # T=20, N=4, C=3
        >>> predictive_uncertainty(probs).mutual_information.shape
        torch.Size([4])
    """
    _check_probabilities(probs)
    return uncertainty_from_log_probs(probs.log(), class_dim=2 - probs.dim())


def uncertainty_from_log_probs(log_probs: Tensor, class_dim: int) -> Uncertainty:
    """``log_probs`` (T, N, ...) with classes in the negative dimension ``class_dim``."""
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])
    predictive_entropy = _entropy(log_mean, class_dim)
    expected_entropy = _entropy(log_probs, class_dim).mean(0)
    # H[pbar] >= E_t H[p_t] by concavity; rounding can leave a tiny negative difference.
    mutual_information = (predictive_entropy - expected_entropy).clamp_min(0)
    return Uncertainty(
        log_mean.exp(),
        predictive_entropy,
        expected_entropy,
        mutual_information,
        _variation_ratio(log_probs, class_dim),
    )


def _entropy(log_probs: Tensor, class_dim: int) -> Tensor:
    probs = log_probs.exp()
    # 0 log 0 = 0 as in xlogy: log_probs is -inf exactly where probs is 0.
    return -torch.where(probs > 0, probs * log_probs, 0.0).sum(class_dim)


def _variation_ratio(log_probs: Tensor, class_dim: int) -> Tensor:
    n_samples, n_classes = log_probs.shape[0], log_probs.shape[class_dim]
    votes = F.one_hot(log_probs.argmax(class_dim), n_classes).sum(0)
    modal_votes = votes.max(-1).values
    return 1 - modal_votes.to(log_probs.dtype) / n_samples


def _check_probabilities(probs: object) -> None:
    if not isinstance(probs, Tensor):
        raise TypeError(f"probs must be a Tensor, got {type(probs).__name__}")
    if not probs.dtype.is_floating_point:
        raise TypeError(f"probs must have a floating-point dtype, got {probs.dtype}")
    if probs.dim() < 3 or probs.numel() == 0:
        raise ValueError(
            "probs must have shape (T, N, C, ...) with no empty dimension, got "
            f"{tuple(probs.shape)}"
        )
    tolerance = max(1e-4, 8 * torch.finfo(probs.dtype).eps)
    check_values(
        lambda: (probs >= 0) & ((probs.sum(2, keepdim=True) - 1).abs() <= tolerance),
        "probs must be non-negative and sum to 1 over the class dimension 2 (within "
        f"{tolerance:g}). Pass probabilities, not logits",
    )
