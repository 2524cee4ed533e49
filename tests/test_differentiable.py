import pytest
import torch
from captum.attr import (
    DeepLift,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    LayerGradCam,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch.func import functional_call

from captum_gradmask import ContrastSaliency, differentiable
from helpers import ModelState, small_cnn

ALL_METHODS = {
    "Saliency": lambda m: Saliency(m),
    "InputXGradient": lambda m: InputXGradient(m),
    "IntegratedGradients": lambda m: IntegratedGradients(m),
    "ContrastSaliency": lambda m: ContrastSaliency(m),
    "LayerGradCam": lambda m: LayerGradCam(m, m[1]),
    "LayerGradientXActivation": lambda m: LayerGradientXActivation(m, m[1]),
}


def _model_and_input(device, seed=0):
    torch.manual_seed(seed)
    model = small_cnn(side=4).to(device).double()
    x = torch.randn(3, 1, 4, 4, device=device, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("name", ALL_METHODS)
def test_values_identical_to_plain_class(device, name):
    model, x = _model_and_input(device)
    plain = ALL_METHODS[name](model)
    ours = differentiable(plain)
    expected = plain.attribute(x, target=1)
    result = ours.attribute(x, target=1)
    assert torch.equal(result, expected)
    assert result.grad_fn is not None


@pytest.mark.parametrize("name", ALL_METHODS)
def test_parameter_gradient_matches_finite_differences(device, name):
    """gradcheck: d attribution / d weight from our graph against finite differences."""
    model, x = _model_and_input(device, seed=1)
    weight = model[0].weight.detach().clone().requires_grad_()

    def attribution_of(w):
        def forward(inputs):
            return functional_call(model, {"0.weight": w}, (inputs,))

        explainer = ALL_METHODS[name](model)
        explainer.forward_func = forward
        kwargs = dict(n_steps=8) if "Integrated" in name else {}
        return differentiable(explainer).attribute(x, target=1, **kwargs)

    assert torch.autograd.gradcheck(attribution_of, (weight,), atol=1e-6, rtol=1e-5)


def _parameter_gradients(loss, model):
    # The last bias never reaches an input gradient: its gradient is zero.
    return torch.autograd.grad(
        loss, list(model.parameters()), allow_unused=True, materialize_grads=True
    )


def _hand_written_input_gradient(model, x, objective):
    x = x.detach().requires_grad_()
    (gradient,) = torch.autograd.grad(objective(model(x)).sum(), x, create_graph=True)
    return x, gradient


@pytest.mark.parametrize("name", ["Saliency", "InputXGradient", "ContrastSaliency"])
def test_loss_gradient_matches_hand_written_double_backprop(device, name):
    model, x = _model_and_input(device, seed=2)
    outside = (torch.rand_like(x) > 0.5).double()
    sign_kwargs = {} if name == "InputXGradient" else dict(abs=False)
    ours = differentiable(ALL_METHODS[name](model)).attribute(x, target=1, **sign_kwargs)
    ours_grads = _parameter_gradients((outside * ours).pow(2).sum(), model)

    if name == "ContrastSaliency":
        objective = lambda logits: (logits[:, 1] - logits[:, 0]).abs()
    else:
        objective = lambda logits: logits[:, 1]
    leaf, gradient = _hand_written_input_gradient(model, x, objective)
    attribution = gradient * leaf if name == "InputXGradient" else gradient
    expected = _parameter_gradients((outside * attribution).pow(2).sum(), model)
    for got, want in zip(ours_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_layer_grad_cam_loss_gradient_matches_hand_written(device):
    model, x = _model_and_input(device, seed=3)
    ours = differentiable(LayerGradCam(model, model[1])).attribute(x, target=1)
    ours_grads = _parameter_gradients(ours.pow(2).sum(), model)

    activations = model[1](model[0](x))
    logits = model[3](model[2](activations))
    (layer_gradient,) = torch.autograd.grad(logits[:, 1].sum(), activations, create_graph=True)
    channel_weights = layer_gradient.mean(dim=(2, 3), keepdim=True)
    cam = (channel_weights * activations).sum(dim=1, keepdim=True)
    expected = _parameter_gradients(cam.pow(2).sum(), model)
    for got, want in zip(ours_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_integrated_gradients_loss_gradient_matches_hand_written(device):
    model, x = _model_and_input(device, seed=4)
    n_steps = 4  # Captum keeps step sizes in float32: 1/4 is exact there
    ours = differentiable(IntegratedGradients(model)).attribute(
        x, target=1, n_steps=n_steps, method="riemann_left"
    )
    ours_grads = _parameter_gradients(ours.pow(2).sum(), model)

    path_gradient_sum = 0
    for step in range(n_steps):
        point = (step / n_steps * x).requires_grad_()
        (gradient,) = torch.autograd.grad(model(point)[:, 1].sum(), point, create_graph=True)
        path_gradient_sum = path_gradient_sum + gradient / n_steps
    expected = _parameter_gradients((path_gradient_sum * x).pow(2).sum(), model)
    for got, want in zip(ours_grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_original_is_not_mutated(device):
    model, x = _model_and_input(device, seed=5)
    plain = Saliency(model)
    gradient_func = plain.gradient_func
    differentiable(plain)
    assert plain.gradient_func is gradient_func
    assert "attribute" not in vars(plain)
    attribution = plain.attribute(x, target=1)
    assert attribution.grad_fn is None


@pytest.mark.parametrize(
    "make",
    [
        lambda m: GuidedBackprop(m),
        lambda m: DeepLift(m),
        lambda m: NoiseTunnel(Saliency(m)),
        lambda m: Occlusion(m),
        lambda m: LayerIntegratedGradients(m, m[1]),
    ],
    ids=["GuidedBackprop", "DeepLift", "NoiseTunnel", "Occlusion", "LayerIntegratedGradients"],
)
def test_unsupported_methods_raise_naming_the_method(make):
    model = small_cnn(side=4)
    explainer = make(model)
    with pytest.raises(TypeError, match=f"cannot make {type(explainer).__name__} differentiable"):
        differentiable(explainer)


def test_internal_batch_size_is_refused():
    model, x = _model_and_input("cpu")
    ig = differentiable(IntegratedGradients(model))
    with pytest.raises(ValueError, match="internal_batch_size"):
        ig.attribute(x, target=1, internal_batch_size=2)


def test_requires_grad_flags_restored_after_error(device):
    model, x = _model_and_input(device)
    state = ModelState(model, x)
    with pytest.raises(Exception):
        differentiable(Saliency(model)).attribute(x, target=99)
    state.assert_unchanged()


@pytest.mark.parametrize("name", ["saliency", "integrated_gradients"])
def test_runs_inside_noise_tunnel(device, name):
    """NoiseTunnel calls ``attribute.__wrapped__(method, ...)``: same values as the
    plain class under the same noise."""
    torch.manual_seed(0)
    model = small_cnn().to(device).double()
    x = torch.randn(2, 1, 6, 6, device=device, dtype=torch.float64)
    method = {"saliency": Saliency, "integrated_gradients": IntegratedGradients}[name]
    kwargs = dict(target=1, nt_samples=3, stdevs=0.1)
    torch.manual_seed(1)
    ours = NoiseTunnel(differentiable(method(model))).attribute(x, **kwargs)
    torch.manual_seed(1)
    plain = NoiseTunnel(method(model)).attribute(x, **kwargs)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
