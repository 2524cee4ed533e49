"""GradMask with layer saliencies (a map at one layer, upsampled to the input) on the
networks users train, float64 and float32, 1-D to 3-D, batches of 1 and 2, against
a hand-written double-backprop reference (helpers.reference_penalty) and against
Captum's LayerGradCam and LayerGradientXActivation."""

import copy
import warnings

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation
from torch import nn

from benchmarks._networks import relu_cnn
from captum_gradmask import GradMask, gradmask_penalty
from helpers import parameter_gradients, reference_penalty, relative_error
from test_gradmask_networks import NETWORKS, double_backward_attention, network_and_batch
from test_gradmask_networks import ours as networks_ours

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER_SALIENCIES = ["layer_gradient_x_activation", "layer_grad_cam"]
NORMS = ["sq_l2", "l2", "l1"]
FLOAT64_TOLERANCE = 1e-9
FLOAT32_TOLERANCE = 1e-3


def chosen_layer(model):
    """The last layer with a spatial output: the attention net's patch embedding,
    else the module before global average pooling (every network here is a
    Sequential ending in pooling, Flatten and a Linear head)."""
    return model.embed if hasattr(model, "embed") else model[-4]


def reference(model, x, mask, **options):
    """The float64 reference on a float64 twin of the model, and its parameter gradients."""
    twin = copy.deepcopy(model).double()
    layer = chosen_layer(twin)
    with double_backward_attention():
        penalty = reference_penalty(twin, x.double(), mask.double(), layer=layer, **options)
    return penalty, parameter_gradients(penalty, twin)


def ours(model, x, mask, method, **options):
    """test_gradmask_networks' call, at the chosen layer (no random draws to seed)."""
    return networks_ours(model, x, mask, method, seed=0, layer=chosen_layer(model), **options)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("saliency", LAYER_SALIENCIES)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_the_reference_in_float64_and_float32(device, name, dims, n, saliency, norm):
    model, x, mask = network_and_batch(name, dims, n, device)
    options = dict(saliency=saliency, norm=norm, target=2, contrast_target=0)
    reference_value, reference_gradients = reference(model, x, mask, **options)
    model64 = copy.deepcopy(model).double()
    for method in ["exact", "forward_mode"]:
        value, gradients = ours(model64, x.double(), mask.double(), method, **options)
        assert relative_error([value], [reference_value]) <= FLOAT64_TOLERANCE
        assert relative_error(gradients, reference_gradients) <= FLOAT64_TOLERANCE
        value, gradients = ours(model, x, mask, method, **options)
        assert value.dtype == torch.float32
        assert relative_error([value], [reference_value]) <= FLOAT32_TOLERANCE
        assert relative_error(gradients, reference_gradients) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("variant", ["contrast", "class", "target", "rrr"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("saliency", LAYER_SALIENCIES)
def test_every_variant_reduction_mask_option_and_method(device, variant, reduction, saliency):
    model, x, mask = network_and_batch("resnet_train", 2, 2, device)
    model, x, mask = model.double(), x.double(), mask.double()
    target = torch.tensor([2, 1], device=device) if variant == "target" else 2
    has_mask = torch.tensor([False, True], device=device)
    options = dict(variant=variant, target=target, saliency=saliency, reduction=reduction, dilate=1, norm="l1")
    reference_value, reference_gradients = reference(model, x, mask, has_mask=has_mask, **options)
    for method in ["exact", "forward_mode", "finite_difference"]:
        tolerance = 1e-4 if method == "finite_difference" else FLOAT64_TOLERANCE
        value, gradients = ours(model, x, mask, method, has_mask=has_mask, **options)
        assert relative_error([value], [reference_value]) <= FLOAT64_TOLERANCE
        assert relative_error(gradients, reference_gradients) <= tolerance


@pytest.mark.parametrize("saliency", LAYER_SALIENCIES)
def test_one_dimensional_inputs_and_a_mask_per_channel(device, saliency):
    torch.manual_seed(0)
    model = relu_cnn(1, 2, 3, width=4).double().to(device)
    x = torch.randn(2, 2, 12, dtype=torch.double, device=device)
    mask = torch.zeros(2, 2, 12, dtype=torch.double, device=device)
    mask[0, 0, :4] = 1  # a lesion in one channel masks that place in the map
    mask[1, 1, 6:] = 1
    options = dict(saliency=saliency, target=2)
    reference_value, reference_gradients = reference(model, x, mask, **options)
    value, gradients = ours(model, x, mask, "exact", **options)
    assert relative_error([value], [reference_value]) <= FLOAT64_TOLERANCE
    assert relative_error(gradients, reference_gradients) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("captum_class, saliency", [
    (LayerGradCam, "layer_grad_cam"), (LayerGradientXActivation, "layer_gradient_x_activation"),
])
@pytest.mark.parametrize("dims", [2, 3])
def test_the_map_is_captums_upsampled(device, captum_class, saliency, dims):
    """No lesion, variant "class", sum of squares: the penalty is the sum over
    examples of Captum's map (channel-summed), upsampled linearly, squared."""
    model, x, _ = network_and_batch("batchnorm_eval", dims, 2, device)
    model, x = model.double(), x.double()
    layer = chosen_layer(model)
    captum_map = captum_class(model, layer).attribute(x, target=2).sum(1, keepdim=True)
    upsampled = LayerAttribution.interpolate(captum_map, x.shape[2:], ("bilinear", "trilinear")[dims - 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # variant="class" warns on 2-logit models only; this has 3
        penalty = gradmask_penalty(model, x, torch.zeros_like(x), variant="class", target=2, saliency=saliency,
                                   layer=layer, reduction="sum").penalty
    torch.testing.assert_close(penalty, upsampled.pow(2).sum(), rtol=1e-12, atol=0)


def test_in_place_operations_after_the_layer_change_nothing(device):
    model, x, mask = network_and_batch("relu_maxpool", 2, 2, device)
    in_place = copy.deepcopy(model)
    for module in in_place.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    layer_index = 3  # the second convolution, whose output a ReLU(inplace=True) overwrites
    for method in ["exact", "forward_mode"]:
        expected = gradmask_penalty(model, x, mask, saliency="layer_gradient_x_activation",
                                    layer=model[layer_index], method=method)
        actual = gradmask_penalty(in_place, x, mask, saliency="layer_gradient_x_activation",
                                  layer=in_place[layer_index], method=method)
        torch.testing.assert_close(actual.penalty, expected.penalty)
        torch.testing.assert_close(actual.outputs, expected.outputs)
        torch.testing.assert_close(parameter_gradients(actual.penalty, in_place),
                                   parameter_gradients(expected.penalty, model))


def test_outputs_are_the_models_and_hooks_are_removed(device):
    model, x, mask = network_and_batch("relu_maxpool", 2, 2, device)
    layer = chosen_layer(model)
    for method in ["exact", "forward_mode", "finite_difference"]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # finite_difference on a ReLU net
            outputs, penalty = gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=layer, method=method)
        torch.testing.assert_close(outputs, model(x))
        outputs.sum().backward()  # the outputs carry their graph
        assert not layer._forward_hooks
    with torch.no_grad():
        outputs, penalty = gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=layer)
    assert not outputs.requires_grad and not penalty.requires_grad and penalty > 0


def test_gradmask_module_shows_the_layer_by_name():
    model, _, _ = network_and_batch("relu_maxpool", 2, 1, "cpu")
    gradmask = GradMask(model, saliency="layer_gradient_x_activation", layer=model[4])
    assert "saliency='layer_gradient_x_activation'" in repr(gradmask) and "layer='4'" in repr(gradmask)


# --- errors ---


def test_layer_saliency_needs_a_layer_and_the_layer_a_layer_saliency():
    model, x, mask = network_and_batch("relu_maxpool", 2, 1, "cpu")
    with pytest.raises(TypeError, match=r"saliency='layer_grad_cam' needs layer=, a module of the model .*got None"):
        GradMask(model, saliency="layer_grad_cam")
    with pytest.raises(TypeError, match=r"needs layer=, a module of the model .*got 'features'"):
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer="features")
    with pytest.raises(ValueError, match=r"layer is the layer of saliency 'layer_gradient_x_activation' or 'layer_grad_cam'; got saliency='gradient'"):
        gradmask_penalty(model, x, mask, layer=model[4])
    with pytest.raises(ValueError, match="baselines are the references of saliency='expected_gradients'"):
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=model[4], baselines=0.0)


def test_a_layer_outside_the_model_or_not_run_is_refused():
    model, x, mask = network_and_batch("relu_maxpool", 2, 1, "cpu")
    stranger = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="layer Conv2d is not a module of the model; pass one of its modules"):
        GradMask(model, saliency="layer_grad_cam", layer=stranger)
    with pytest.raises(ValueError, match="layer Conv2d is not a module of the model"):
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=stranger)
    with pytest.raises(ValueError, match="layer Conv2d did not run in the forward pass"):
        gradmask_penalty(lambda inputs: model(inputs), x, mask, saliency="layer_grad_cam", layer=stranger)
    assert not stranger._forward_hooks


def test_a_layer_run_twice_or_without_spatial_output_is_refused():
    model, x, mask = network_and_batch("relu_maxpool", 2, 1, "cpu")
    twice = lambda inputs: model(inputs) + model(inputs)  # noqa: E731
    with pytest.raises(ValueError, match=r"layer ReLU ran 2 times in one forward pass; pass a module that runs once"):
        gradmask_penalty(twice, x, mask, saliency="layer_grad_cam", layer=model[4])
    with pytest.raises(ValueError, match=r"layer Flatten must output a map \(N=1, K, \*, \*\) with the inputs' 2 spatial dims, larger than one pixel, got shape \(1, 4\); pick a convolutional layer"):
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=model[6])
    assert not model[4]._forward_hooks and not model[6]._forward_hooks
    before = [p.clone() for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_a_layer_with_a_tuple_output_is_refused():
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x), x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TwoOutputs()
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            features, _ = self.block(x)
            return self.head(features.mean((2, 3)))

    model = Model()
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(TypeError, match=r"layer TwoOutputs must output a Tensor \(N=2, K, \*, \*\), got a tuple"):
        gradmask_penalty(model, x, torch.zeros_like(x), saliency="layer_grad_cam", layer=model.block)


def test_a_frozen_network_below_the_layer(device):
    """Only the layers above train (a frozen backbone): the map starts at the layer."""
    model, x, mask = network_and_batch("relu_maxpool", 2, 2, device)
    model = model.double()
    x, mask = x.double(), mask.double()
    reference_value, reference_gradients = reference(model, x, mask, saliency="layer_gradient_x_activation")
    for parameter in model[:4].parameters():
        parameter.requires_grad_(False)
    head = [p for p in model.parameters() if p.requires_grad]
    for method in ["exact", "forward_mode"]:
        penalty = gradmask_penalty(model, x, mask, saliency="layer_gradient_x_activation", layer=model[4],
                                   method=method).penalty
        gradients = torch.autograd.grad(penalty, head)
        assert relative_error([penalty], [reference_value]) <= FLOAT64_TOLERANCE
        assert relative_error(gradients, reference_gradients[-len(head):]) <= FLOAT64_TOLERANCE
    assert not x.requires_grad


def test_grad_cam_warns_when_its_channel_weights_vanish():
    """A BatchNorm in training mode right after the layer: at batch size 1 the
    gradient into the layer averages to 0 per channel, and Grad-CAM's weights too."""
    model, x, mask = network_and_batch("batchnorm_train", 2, 1, "cpu")
    with pytest.warns(UserWarning, match="saliency='layer_grad_cam': the channel weights .* vanish"):
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=model[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=model[2])  # after BatchNorm, ReLU


def test_a_layer_without_spatial_extent_is_refused():
    model, x, mask = network_and_batch("relu_maxpool", 2, 1, "cpu")
    with pytest.raises(ValueError, match=r"layer AdaptiveAvgPool2d must output a map .* larger than one pixel, got shape \(1, 4, 1, 1\)"):
        gradmask_penalty(model, x, mask, saliency="layer_grad_cam", layer=model[5])
