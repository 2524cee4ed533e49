"""GradMask on MONAI's networks (an optional extra; skipped without MONAI): float32
DenseNet121 (2-D, training mode, batch 2), ResNet-18 (3-D, training mode, batch 1)
and SEResNet50 (2-D, eval mode), against a float64 double-backprop reference written
out by hand (helpers.reference_penalty); input-gradient and layer saliencies."""

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


# A block in the middle of each network: its output is a map of 1/8 of the side.
MIDDLE_LAYERS = {
    "DenseNet121 2-D train": lambda model: model.features.denseblock2,
    "ResNet-18 3-D train": lambda model: model.layer2,
    "SEResNet50 2-D eval": lambda model: model.layer2,
}


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("saliency", ["layer_gradient_x_activation", "layer_grad_cam"])
def test_layer_saliencies_match_float64(device, name, saliency):
    """Float64 to 1e-9; float32 to 5e-3 (measured: up to 1.7e-3 on the 3-D ResNet in
    training mode, whose BatchNorm sees 8 values per channel in its last stage)."""
    model, x, mask = network_and_batch(name, device)
    twin = copy.deepcopy(model).double()
    reference = reference_penalty(twin, x.double(), mask.double(), saliency=saliency,
                                  layer=MIDDLE_LAYERS[name](twin))
    reference_gradients = parameter_gradients(reference, twin)
    model64 = copy.deepcopy(model).double()
    for network, inputs, masks, tolerance in [(model64, x.double(), mask.double(), 1e-9), (model, x, mask, 5e-3)]:
        for method in ["exact", "forward_mode"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # BatchNorm in training mode
                penalty = gradmask_penalty(network, inputs, masks, saliency=saliency,
                                           layer=MIDDLE_LAYERS[name](network), method=method).penalty
            assert relative_error([penalty], [reference]) <= tolerance
            assert relative_error(parameter_gradients(penalty, network), reference_gradients) <= tolerance
