"""GradMask as users call it: in validation loops under no_grad, through lambdas and
other callables around their models, with integer label masks, and on models where
a method cannot run."""

import copy
import functools
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks._networks import AttentionNet, batchnorm_cnn
from captum_gradmask import GradMask, gradmask_penalty
from helpers import parameter_gradients, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["exact", "forward_mode", "finite_difference"]


def bn_dropout_cnn(training=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 2),
    ).double()
    return model.train(training)


def lesion_batch(n=2, side=6, device="cpu"):
    torch.manual_seed(1)
    x = torch.randn(n, 1, side, side, dtype=torch.float64, device=device)
    mask = torch.zeros(n, 1, side, side, dtype=torch.float64, device=device)
    mask[..., :3, :3] = 1.0
    return x, mask


# --- validation loops ---


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("saliency", ["gradient", "expected_gradients"])
def test_under_no_grad_the_penalty_and_outputs_equal_the_grad_enabled_ones(device, method, saliency):
    model = bn_dropout_cnn(training=False).to(device)
    x, mask = lesion_batch(device=device)
    torch.manual_seed(5)
    enabled = gradmask_penalty(model, x, mask, method=method, saliency=saliency)
    torch.manual_seed(5)
    with torch.no_grad():
        disabled = gradmask_penalty(model, x, mask, method=method, saliency=saliency)
    assert torch.equal(disabled.penalty, enabled.penalty.detach())
    assert torch.equal(disabled.outputs, enabled.outputs.detach())
    assert disabled.penalty.grad_fn is None and disabled.outputs.grad_fn is None
    assert not disabled.penalty.requires_grad


def test_no_grad_is_still_on_after_the_call():
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    with torch.no_grad():
        GradMask(model)(x, mask)
        assert not torch.is_grad_enabled()


# --- callables around a model ---


def tuple_model(model):
    """A model returning (logits, features), like MONAI's ViT."""

    class TupleOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x), x.mean()

    return TupleOutput()


class Wrapper:
    """A callable object holding the model as an attribute."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x)


class Trainer:
    """A plain object holding the model, whose method builds the forward function."""

    def __init__(self, model):
        self.model = model

    def forward_function(self):
        return lambda x: self.model(x)


def callables_around(model):
    picked = tuple_model(model)
    return {
        "lambda over an object's attribute": Trainer(model).forward_function(),
        "lambda": lambda x: model(x),
        "lambda picking a tuple entry": lambda x: picked(x)[0],
        "partial": functools.partial(model.forward),
        "bound method": model.forward,
        "callable object": Wrapper(model),
    }


@pytest.mark.parametrize("kind", list(callables_around(nn.Identity())))
@pytest.mark.parametrize("method", METHODS)
def test_a_callable_gets_the_batch_norm_and_random_state_handling_of_its_model(kind, method):
    model, twin = bn_dropout_cnn(), bn_dropout_cnn()
    x, mask = lesion_batch()
    forward_func = callables_around(model)[kind]
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        through_callable = gradmask_penalty(forward_func, x, mask, method=method)
    rng_after_callable = torch.get_rng_state()
    torch.manual_seed(2)
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        through_model = gradmask_penalty(twin, x, mask, method=method)
    assert torch.equal(torch.get_rng_state(), rng_after_callable)
    assert torch.equal(through_callable.penalty, through_model.penalty)
    for ours, reference in zip(model.buffers(), twin.buffers()):
        assert torch.equal(ours, reference)  # running statistics updated once
    assert relative_error(
        parameter_gradients(through_callable.penalty, model),
        parameter_gradients(through_model.penalty, twin),
    ) <= 1e-12


def test_a_failing_lambda_leaves_batch_norm_statistics_and_random_state_unchanged():
    model = bn_dropout_cnn()
    x, mask = lesion_batch()
    saved_buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(3)
    saved_rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="BatchNorm"), pytest.raises(ValueError, match="^target must be in"):
        gradmask_penalty(lambda inputs: model(inputs), x, mask, target=5)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), saved_buffers))
    assert torch.equal(torch.get_rng_state(), saved_rng)


def test_a_model_returning_a_tuple_is_refused_with_how_to_wrap_it():
    model = tuple_model(bn_dropout_cnn(training=False))
    x, mask = lesion_batch()
    with pytest.raises(TypeError, match=r"^forward_func returned a tuple of 2; .*lambda x: model\(x\)\[0\]"):
        gradmask_penalty(model, x, mask)


def test_a_segmentation_output_is_refused_with_a_hint():
    model = nn.Conv2d(1, 2, 3, padding=1).double()
    x, mask = lesion_batch()
    with pytest.raises(ValueError, match="^forward_func must return logits of shape .* segmentation network"):
        gradmask_penalty(model, x, mask)


# --- masks ---


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64])
def test_bool_integer_and_float_masks_give_the_same_penalty(dtype):
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    expected = gradmask_penalty(model, x, mask, dilate=1).penalty
    assert torch.equal(gradmask_penalty(model, x, mask.to(dtype), dilate=1).penalty, expected)


# --- methods that cannot run on a model ---


class _NoJvpSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_forward_mode_on_an_operation_without_forward_derivative_names_the_other_methods():
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    with pytest.raises(NotImplementedError, match="^method='forward_mode' needs forward-mode derivatives.*method='exact'"):
        gradmask_penalty(lambda inputs: model(_NoJvpSquare.apply(inputs)), x, mask, method="forward_mode")


def test_forward_mode_refuses_attention_dropout_in_training():
    torch.manual_seed(0)
    model = AttentionNet(2, 1, 2, width=8).train()

    def with_attention_dropout(x):
        original = torch.nn.functional.scaled_dot_product_attention
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(
                torch.nn.functional, "scaled_dot_product_attention",
                lambda q, k, v: original(q, k, v, dropout_p=0.1),
            )
            return model(x)

    x, mask = lesion_batch(side=8)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        gradmask_penalty(with_attention_dropout, x.float(), mask.float(), method="forward_mode")


def test_finite_difference_on_a_smooth_float64_net_does_not_warn():
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradmask_penalty(model, x, mask, method="finite_difference")


def test_finite_difference_warning_is_shown_once_per_call_site():
    model = batchnorm_cnn(2, 1, 2).eval()
    x, mask = (t.float() for t in lesion_batch(side=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            gradmask_penalty(model, x, mask, method="finite_difference")
        GradMask(model, method="finite_difference")(x, mask)
    messages = [w for w in caught if "finite_difference" in str(w.message)]
    assert len(messages) == 2
    assert all(w.filename == __file__ for w in messages)


def test_finite_difference_warns_when_its_quotient_is_off_its_first_order_term(monkeypatch):
    import captum_gradmask._directional as directional

    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    monkeypatch.setattr(directional, "QUOTIENT_TOLERANCE", 0.0)  # any rounding is "off"
    with pytest.warns(UserWarning, match="difference quotient is off its exact first-order term"):
        gradmask_penalty(model, x, mask, method="finite_difference")


# --- what an outside review found ---


def float32_batch(n=2, side=8):
    torch.manual_seed(1)
    x = torch.randn(n, 2, side, side)
    mask = torch.zeros(n, 1, side, side)
    mask[..., : side // 2, : side // 2] = 1.0
    return x, mask


class DirectCalls(nn.Module):
    """Operations called through torch.* and other entry points than nn.functional."""

    def __init__(self, operation):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.operation = operation

    def forward(self, x):
        return self.head(self.operation(self.conv(x)))


DIRECT_CALLS = {
    "torch.layer_norm": lambda z: torch.layer_norm(z, [4, 8, 8]).relu().mean((2, 3)),
    "torch.batch_norm, training": lambda z: torch.batch_norm(
        z, None, None, None, None, True, 0.1, 1e-5, False
    ).relu().mean((2, 3)),
    "torch.instance_norm": lambda z: torch.instance_norm(
        z, None, None, None, None, True, 0.1, 1e-5, False
    ).relu().mean((2, 3)),
    "F.softmin": lambda z: (torch.nn.functional.softmin(z.flatten(2), dim=-1) * z.flatten(2)).sum(-1),
    "nn.Softmax() without dim": lambda z: nn.Softmax()(z.flatten(2).mean(-1)),
    "torch.special.softmax": lambda z: torch.special.softmax(z.mean((2, 3)), 1),
    "logsumexp over two dims": lambda z: torch.logsumexp(z, dim=(2, 3)),
}


@pytest.mark.parametrize("name", DIRECT_CALLS)
def test_forward_mode_equals_exact_on_operations_called_directly(name):
    model = DirectCalls(DIRECT_CALLS[name])
    x, mask = float32_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.Softmax() without dim
        torch.manual_seed(0)
        exact = gradmask_penalty(model, x, mask, target=2).penalty
        torch.manual_seed(0)
        forward = gradmask_penalty(model, x, mask, target=2, method="forward_mode").penalty
    assert relative_error(
        parameter_gradients(forward, model), parameter_gradients(exact, model)
    ) <= 1e-4


def test_forward_mode_refuses_multi_head_attention_naming_what_works():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            tokens = x.reshape(x.shape[0], 16, 8)
            return self.head(self.attention(tokens, tokens, tokens)[0].mean(1))

    x, mask = float32_batch()
    with pytest.raises(NotImplementedError, match="^method='forward_mode' does not run nn.MultiheadAttention.*SDPBackend.MATH"):
        gradmask_penalty(Attention(), x, mask, target=2, method="forward_mode")


@pytest.mark.parametrize("layer, method", [(nn.GLU(1), "forward_mode"), (nn.Hardsigmoid(), "exact")])
def test_an_operation_whose_backward_cannot_run_is_refused_at_the_call(layer, method):
    channels = 8 if isinstance(layer, nn.GLU) else 4
    model = nn.Sequential(nn.Conv2d(2, channels, 3, padding=1), layer, nn.Flatten(), nn.LazyLinear(3))
    x, mask = float32_batch()
    model(x)
    with pytest.raises((NotImplementedError, RuntimeError), match=f"^method='{method}' needs the"):
        gradmask_penalty(model, x, mask, target=2, method=method)


def test_exact_refuses_a_once_differentiable_function_at_the_call():
    class Swish(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * torch.sigmoid(x)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            s = torch.sigmoid(x)
            return grad * (s + x * s * (1 - s))

    conv, head = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4, 3)
    x, mask = float32_batch()
    with pytest.raises(RuntimeError, match="^method='exact' needs the double backward.*once_differentiable"):
        gradmask_penalty(lambda z: head(Swish.apply(conv(z)).mean((2, 3))), x, mask, target=2)


def test_replayed_passes_start_from_the_buffers_the_first_pass_started_from():
    # spectral_norm updates its power-iteration vector in every training forward.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.utils.spectral_norm(nn.Conv2d(2, 4, 3, padding=1)), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    ).train()
    twin = copy.deepcopy(model)
    x, mask = float32_batch()
    exact = gradmask_penalty(model, x, mask, target=2).penalty
    forward = gradmask_penalty(twin, x, mask, target=2, method="forward_mode").penalty
    assert relative_error(parameter_gradients(forward, twin), parameter_gradients(exact, model)) <= 1e-4
    for ours, theirs in zip(model.buffers(), twin.buffers()):
        assert torch.equal(ours, theirs)  # one power iteration per call, with either method


def test_batch_norm_reached_through_a_module_attribute_updates_once():
    holder = types.ModuleType("holder")
    holder.net = bn_dropout_cnn()
    twin = copy.deepcopy(holder.net)
    x, mask = lesion_batch()
    with pytest.warns(UserWarning, match="BatchNorm in training mode"):
        gradmask_penalty(lambda z: holder.net(z), x, mask, method="forward_mode")
    torch.manual_seed(0)
    twin(x)
    for ours, theirs in zip(holder.net.buffers(), twin.buffers()):
        assert torch.equal(ours, theirs)


def test_a_failing_call_leaves_instance_norm_statistics_unchanged():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.InstanceNorm2d(4, track_running_stats=True), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 2),
    ).double().train()
    x, mask = lesion_batch()
    saved = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="^target must be in"):
        gradmask_penalty(model, x, mask, target=7)
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), saved))


def test_baselines_that_are_the_inputs_are_refused():
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    with pytest.raises(ValueError, match="^baselines shares memory with the inputs"):
        gradmask_penalty(model, x, mask, saliency="expected_gradients", baselines=x)


@pytest.mark.parametrize("target", [np.int64(1), torch.tensor(1)])
def test_integer_targets_of_numpy_and_zero_dim_tensors_are_taken(target):
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    expected = gradmask_penalty(model, x, mask, target=1).penalty
    assert torch.equal(gradmask_penalty(model, x, mask, target=target).penalty, expected)


def test_float_per_example_targets_are_refused():
    model = bn_dropout_cnn(training=False)
    x, mask = lesion_batch()
    with pytest.raises(TypeError, match="^target must be an int or integer labels"):
        gradmask_penalty(model, x, mask, variant="target", target=[1.7, 0.2])


def test_reference_images_sliced_from_the_tensor_of_the_inputs_are_taken():
    model = bn_dropout_cnn(training=False)
    images = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    x, references = images[:2], images[2:]  # one storage, no shared element
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    penalty = gradmask_penalty(model, x, mask, saliency="expected_gradients", baselines=references).penalty
    assert penalty > 0


def test_batch_norm_in_training_mode_warns_only_when_it_couples_examples():
    model = batchnorm_cnn(2, 1, 2, width=4).train()
    x, mask = torch.randn(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one example: nothing to couple
        gradmask_penalty(model, x[:1], mask[:1])
    with pytest.warns(UserWarning, match="BatchNorm in training mode couples the examples of a batch"):
        gradmask_penalty(model, x, mask)
