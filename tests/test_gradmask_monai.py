"""GradMask on MONAI's networks (an optional extra; skipped without MONAI): float32
DenseNet121 (2-D, training mode, batch 2), ResNet-18 (3-D, training mode, batch 1)
and SEResNet50 (2-D, eval mode), against a float64 double-backprop reference written
out by hand (helpers.reference_penalty)."""

import copy
import warnings

import pytest
import torch

from captum_gradmask import gradmask_penalty
from helpers import parameter_gradients, reference_penalty, relative_error

nets = pytest.importorskip("monai.networks.nets", reason="MONAI is an optional extra")

pytestmark = pytest.mark.usefixtures("one_thread")

# Inputs large enough that BatchNorm in training mode sees at least 8 values per
# channel in the last layers (fewer make its statistics degenerate).
NETWORKS = {
    "DenseNet121 2-D train": (
        lambda: nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).train(), (2, 1, 64, 64)
    ),
    "ResNet-18 3-D train": (
        lambda: nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2).train(), (1, 1, 48, 48, 48)
    ),
    "SEResNet50 2-D eval": (
        lambda: nets.SEResNet50(spatial_dims=2, in_channels=1, num_classes=2).eval(), (2, 1, 32, 32)
    ),
}


def network_and_batch(name, device):
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = build().to(device)
    x = torch.randn(*shape, device=device)
    mask = torch.zeros(shape[0], 1, *shape[2:], device=device)
    mask[(slice(None), 0, *[slice(side // 4, 3 * side // 4) for side in shape[2:]])] = 1.0
    return model, x, mask


@pytest.mark.parametrize("name", NETWORKS)
def test_forward_mode_equals_exact_and_both_match_float64(device, name):
    model, x, mask = network_and_batch(name, device)
    twin = copy.deepcopy(model).double()
    reference = reference_penalty(twin, x.double(), mask.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm in training mode
        exact = gradmask_penalty(model, x, mask).penalty
        forward = gradmask_penalty(model, x, mask, method="forward_mode").penalty
    exact_gradients = parameter_gradients(exact, model)
    assert relative_error(parameter_gradients(forward, model), exact_gradients) <= 1e-4
    assert relative_error([exact], [reference]) <= 1e-3
    assert relative_error(exact_gradients, parameter_gradients(reference, twin)) <= 1e-3


@pytest.mark.parametrize("name", ["DenseNet121 2-D train"])
def test_finite_difference_warns_on_a_float32_monai_network(name):
    model, x, mask = network_and_batch(name, "cpu")
    with pytest.warns(UserWarning, match="method='finite_difference' in torch.float32 on a network with piecewise-linear"):
        gradmask_penalty(model, x, mask, method="finite_difference")
