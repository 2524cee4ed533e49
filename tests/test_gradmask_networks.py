"""GradMask on the networks users train: float32 ReLU, max-pool, BatchNorm (eval and
training), DenseNet- and ResNet-style CNNs and an attention network (LayerNorm,
softmax attention, GELU), 2-D and 3-D, batches of 1 and 2, against a float64
double-backprop reference written out by hand (helpers.reference_penalty)."""

import contextlib
import copy
import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks._networks import AttentionNet, batchnorm_cnn, densenet, relu_cnn, resnet
from captum_gradmask import gradmask_penalty
from helpers import parameter_gradients, path_draws, reference_penalty, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

N_CLASSES = 3
NETWORKS = {
    # name: (builder, training mode, spatial side for 2-D and 3-D)
    "relu_maxpool": (lambda dims: relu_cnn(dims, 2, N_CLASSES, width=4), False, {2: 8, 3: 4}),
    "batchnorm_eval": (lambda dims: batchnorm_cnn(dims, 2, N_CLASSES, width=4), False, {2: 8, 3: 4}),
    "batchnorm_train": (lambda dims: batchnorm_cnn(dims, 2, N_CLASSES, width=4), True, {2: 8, 3: 4}),
    "densenet_train": (
        lambda dims: densenet(dims, 2, N_CLASSES, growth=4, block_layers=(2, 2), init_features=8, bottleneck=2),
        True, {2: 16, 3: 16},
    ),
    "resnet_train": (
        lambda dims: resnet(dims, 2, N_CLASSES, widths=(4, 8), blocks=(1, 1)), True, {2: 16, 3: 16}
    ),
    "attention": (lambda dims: AttentionNet(dims, 2, N_CLASSES, width=8), False, {2: 8, 3: 4}),
}
SALIENCIES = ["gradient", "input_x_gradient", "expected_gradients"]
NORMS = ["sq_l2", "l2", "l1"]

# Measured over this grid (216 cases, CPU): forward_mode within 8.1e-7 relative of
# exact in float32; float32 exact within 1.6e-5 of the float64 reference.
FORWARD_MODE_TOLERANCE = 1e-4
FLOAT32_TOLERANCE = 1e-3


def network_and_batch(name, dims, n, device, seed=0):
    builder, training, sides = NETWORKS[name]
    torch.manual_seed(seed)
    model = builder(dims).to(device).train(training)
    side = sides[dims]
    x = torch.randn(n, 2, *[side] * dims, device=device)
    mask = torch.zeros(n, 1, *[side] * dims, device=device)
    for b in range(n):  # a lesion in a different corner for each example
        corner = slice(0, side // 2) if b == 0 else slice(side // 2, side)
        mask[(b, 0, *[corner] * dims)] = 1.0
    return model, x, mask


def double_backward_attention(method="exact"):
    """Flash attention, the default on CPU, has no double backward: the double-backprop
    reference and method="exact" run the math backend (a test below checks the error
    without it); forward_mode and finite_difference run the default."""
    return sdpa_kernel(SDPBackend.MATH) if method == "exact" else contextlib.nullcontext()


def float64_reference(model, x, mask, saliency, seed, **options):
    twin = copy.deepcopy(model).double()
    x64, mask64 = x.double(), mask.double()
    baseline, alpha = (None, None)
    if saliency == "expected_gradients":  # drawn in float32, as GradMask draws them
        baseline, alpha = (t.double() for t in path_draws(copy.deepcopy(model), x, mask, seed))
    with double_backward_attention():
        penalty = reference_penalty(twin, x64, mask64, saliency=saliency, baseline=baseline, alpha=alpha, **options)
        return penalty, parameter_gradients(penalty, twin)


def ours(model, x, mask, method, seed, **options):
    torch.manual_seed(seed)
    with warnings.catch_warnings(), double_backward_attention(method):
        warnings.simplefilter("ignore")  # BatchNorm in training mode: asserted elsewhere
        penalty = gradmask_penalty(model, x, mask, method=method, **options).penalty
    return penalty, parameter_gradients(penalty, model)


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("saliency", SALIENCIES)
@pytest.mark.parametrize("norm", NORMS)
def test_forward_mode_equals_exact_in_float32_and_both_match_float64(device, name, dims, n, saliency, norm):
    model, x, mask = network_and_batch(name, dims, n, device)
    options = dict(saliency=saliency, norm=norm, target=2, contrast_target=0)
    reference_value, reference_gradients = float64_reference(model, x, mask, seed=3, **options)
    exact_value, exact_gradients = ours(model, x, mask, "exact", seed=3, **options)
    forward_value, forward_gradients = ours(model, x, mask, "forward_mode", seed=3, **options)
    assert exact_value.dtype == forward_value.dtype == torch.float32
    assert relative_error([forward_value], [exact_value]) <= 1e-5  # attention: another kernel
    assert relative_error(forward_gradients, exact_gradients) <= FORWARD_MODE_TOLERANCE
    assert relative_error([exact_value], [reference_value]) <= FLOAT32_TOLERANCE
    assert relative_error(exact_gradients, reference_gradients) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("name", ["resnet_train", "attention"])
@pytest.mark.parametrize("variant", ["class", "target", "rrr"])
def test_forward_mode_equals_exact_for_every_variant(device, name, variant):
    model, x, mask = network_and_batch(name, 2, 2, device)
    target = torch.tensor([2, 0], device=device) if variant == "target" else 2
    options = dict(variant=variant, target=target, norm="l1", dilate=1)
    exact_value, exact_gradients = ours(model, x, mask, "exact", seed=0, **options)
    forward_value, forward_gradients = ours(model, x, mask, "forward_mode", seed=0, **options)
    assert relative_error([forward_value], [exact_value]) <= 1e-5  # attention: another kernel
    assert relative_error(forward_gradients, exact_gradients) <= FORWARD_MODE_TOLERANCE


@pytest.mark.parametrize("name", NETWORKS)
def test_finite_difference_matches_the_reference_in_float64(device, name):
    model, x, mask = network_and_batch(name, 2, 2, device)
    model = model.double()
    x, mask = x.double(), mask.double()
    reference_value, reference_gradients = float64_reference(model, x, mask, "gradient", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="BatchNorm in training mode")
        value, gradients = ours(model, x, mask, "finite_difference", seed=0)
    assert relative_error([value], [reference_value]) <= 1e-12
    assert relative_error(gradients, reference_gradients) <= 1e-4


@pytest.mark.parametrize("name", ["relu_maxpool", "batchnorm_eval", "resnet_train"])
def test_finite_difference_warns_in_float32_on_piecewise_linear_networks(name):
    model, x, mask = network_and_batch(name, 2, 2, "cpu")
    with pytest.warns(UserWarning, match="method='finite_difference' in torch.float32 on a network with piecewise-linear layers .*ReLU"):
        gradmask_penalty(model, x, mask, method="finite_difference")


def test_exact_with_flash_attention_raises_naming_the_methods_that_work():
    model, x, mask = network_and_batch("attention", 2, 2, "cpu")
    with pytest.raises(RuntimeError, match="^method='exact' needs the double backward of every operation.*method='forward_mode'.*method='finite_difference'"):
        gradmask_penalty(model, x, mask)
