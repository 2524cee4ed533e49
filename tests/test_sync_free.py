"""Hot paths never read tensor values on the host, so a GPU never waits for them.

Inside ``value_checks(False)`` (checks of values are the one documented exception),
the training step of GradMask (forward and backward), refine_mask, MC-dropout
prediction, uncertainty and attribution, and iterative unveiling must not call
``.item()``, ``bool(tensor)``, ``.tolist()`` or ``.cpu()`` on device data.

Two checks of the same calls: on the "meta" device, whose tensors have shapes but
no values, any such read raises, so this runs on every machine; on CUDA,
``torch.cuda.set_sync_debug_mode("error")`` turns every synchronising call into an
error.
"""

import contextlib

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from captum_gradmask import (
    IterativeUnveiling,
    MCAttribution,
    MCDropout,
    gradmask_penalty,
    predictive_uncertainty,
    refine_mask,
    value_checks,
)

SIDE = 8
GRADMASK_OPTIONS = [
    {},
    {"method": "finite_difference"},
    {"saliency": "expected_gradients"},
    {"saliency": "input_x_gradient", "method": "finite_difference"},
    {"variant": "class", "target": 0},
    {"variant": "rrr", "norm": "l1"},
    {"norm": "l2", "reduction": "sum", "dilate": 1},
]


def dropout_cnn(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(4 * SIDE * SIDE, 3),
    ).to(device)


@pytest.fixture(params=["meta", "cuda"])
def sync_free_device(request):
    """A device on which reading a value fails, and a context that makes it fail."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(request.param)


@contextlib.contextmanager
def no_value_reads(device):
    previous = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else None
    with value_checks(False):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(previous)


def images(device, n=3):
    return torch.rand(n, 1, SIDE, SIDE, device=device)


@pytest.mark.parametrize("options", GRADMASK_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_gradmask_training_step(sync_free_device, options):
    model = dropout_cnn(sync_free_device)
    x, mask = images(sync_free_device), torch.zeros(3, 1, SIDE, SIDE, device=sync_free_device)
    labels = torch.tensor([0, 1, 2], device=sync_free_device)
    options = {**options, "target": labels} if options.get("variant") == "rrr" else options
    with no_value_reads(sync_free_device):
        outputs, penalty = gradmask_penalty(model, x, mask, has_mask=mask[:, 0, 0, 0] == 0, **options)
        loss = nn.functional.cross_entropy(outputs, labels) + penalty
        loss.backward()
    assert model[0].weight.grad.shape == model[0].weight.shape


@pytest.mark.parametrize("threshold_mode", ["value", "quantile"])
def test_refine_mask(sync_free_device, threshold_mode):
    maps = torch.randn(3, 2, SIDE, SIDE, device=sync_free_device)
    with no_value_reads(sync_free_device):
        mask = refine_mask(maps, kernel_size=3, threshold_mode=threshold_mode)
    assert mask.shape == (3, 1, SIDE, SIDE)


def test_mc_dropout(sync_free_device):
    mc_model = MCDropout(dropout_cnn(sync_free_device).eval(), n_samples=4)
    x = images(sync_free_device)
    with no_value_reads(sync_free_device):
        samples = mc_model(x, mc_samples_batch_size=3)
        uncertainty = mc_model.uncertainty(x)
        predictive_uncertainty(samples.softmax(-1))
        mean, std = MCAttribution(Saliency, mc_model).attribute(x, target=1, return_std=True)
    assert samples.shape == (4, 3, 3) and uncertainty.mean.shape == (3, 3)
    assert mean.shape == std.shape == x.shape


def test_unveiling(sync_free_device):
    model = dropout_cnn(sync_free_device).eval()
    x = images(sync_free_device)
    with no_value_reads(sync_free_device):
        result = IterativeUnveiling(NoiseTunnel(Saliency(model))).unveil(
            x, target=1, n_iter=2, kernel_size=3, fill="mean", examples_batch_size=2,
            nt_samples=2,
        )
    assert result.masks.shape == (3, 2, 1, SIDE, SIDE)
