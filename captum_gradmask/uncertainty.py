"""Predictive uncertainty over Monte-Carlo samples: entropies in log space."""

import math
from typing import NamedTuple, Optional

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
    accumulator = UncertaintyAccumulator(class_dim)
    accumulator.add(log_probs)
    return accumulator.result()


class UncertaintyAccumulator:
    """The sums the uncertainty needs, added chunk by chunk of samples, so that memory
    is that of one chunk: logsumexp of the log-probabilities, the summed entropies and
    the votes per class. ``class_dim`` is the negative dimension of the classes."""

    def __init__(self, class_dim: int) -> None:
        self.class_dim = class_dim
        self.n_samples = 0
        self.log_sum: Optional[Tensor] = None
        self.entropy_sum: Optional[Tensor] = None
        self.votes: Optional[Tensor] = None

    def add(self, log_probs: Tensor) -> None:
        """Add samples ``log_probs`` (t, N, ...)."""
        n_classes = log_probs.shape[self.class_dim]
        log_sum = torch.logsumexp(log_probs, dim=0)
        entropy_sum = _entropy(log_probs, self.class_dim).sum(0)
        votes = F.one_hot(log_probs.argmax(self.class_dim), n_classes).sum(0)
        if self.n_samples:
            log_sum = torch.logaddexp(self.log_sum, log_sum)
            entropy_sum, votes = self.entropy_sum + entropy_sum, self.votes + votes
        self.log_sum, self.entropy_sum, self.votes = log_sum, entropy_sum, votes
        self.n_samples += log_probs.shape[0]

    def result(self) -> Uncertainty:
        log_mean = self.log_sum - math.log(self.n_samples)
        predictive_entropy = _entropy(log_mean, self.class_dim)
        expected_entropy = self.entropy_sum / self.n_samples
        # H[pbar] >= E_t H[p_t] by concavity; rounding can leave a tiny negative difference.
        mutual_information = (predictive_entropy - expected_entropy).clamp_min(0)
        modal_votes = self.votes.max(-1).values
        variation_ratio = 1 - modal_votes.to(log_mean.dtype) / self.n_samples
        return Uncertainty(
            log_mean.exp(), predictive_entropy, expected_entropy, mutual_information, variation_ratio
        )


def _entropy(log_probs: Tensor, class_dim: int) -> Tensor:
    probs = log_probs.exp()
    # 0 log 0 = 0 as in xlogy: log_probs is -inf exactly where probs is 0.
    return -torch.where(probs > 0, probs * log_probs, 0.0).sum(class_dim)


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
