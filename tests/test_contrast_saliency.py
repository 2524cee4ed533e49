import itertools

import matplotlib
import numpy as np
import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max
from captum.testing.attr.helpers.test_config import config as captum_configs
from hypothesis import given
from hypothesis import strategies as st

from captum_gradmask import ContrastSaliency
from helpers import ModelState, contrast_reference, small_cnn

matplotlib.use("Agg")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(device, dtype):
    torch.manual_seed(0)
    model = small_cnn(n_classes=3).to(device, dtype)
    x = torch.randn(5, 1, 6, 6, device=device, dtype=dtype)
    ours = ContrastSaliency(model).attribute(x, target=2, contrast_target=0, abs=False)
    reference = contrast_reference(model, x, 2, 0)
    assert ours.dtype == dtype and ours.device == x.device
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double(), reference, rtol=tolerance, atol=tolerance)
    absolute = ContrastSaliency(model).attribute(x, target=2, contrast_target=0)
    torch.testing.assert_close(absolute.double(), reference.abs(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "target, contrast",
    [
        (1, 0),
        (torch.tensor(1), torch.tensor([0])),
        ([1, 0, 2, 1], [0, 2, 1, 2]),
        (torch.tensor([1, 0, 2, 1]), torch.tensor([0, 2, 1, 2])),
    ],
)
def test_target_forms(device, target, contrast):
    torch.manual_seed(1)
    model = small_cnn(n_classes=3).to(device).double()
    x = torch.randn(4, 1, 6, 6, device=device, dtype=torch.float64)
    if isinstance(target, torch.Tensor):
        target, contrast = target.to(device), contrast.to(device)
    ours = ContrastSaliency(model).attribute(x, target=target, contrast_target=contrast)
    as_list = lambda t: (t.tolist() if t.numel() > 1 else [int(t)] * 4) if isinstance(t, torch.Tensor) else (t if isinstance(t, list) else [t] * 4)
    reference = contrast_reference(model, x, as_list(target), as_list(contrast)).abs()
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_tuple_inputs_and_additional_forward_args(device):
    torch.manual_seed(2)
    weight_a = torch.randn(3, 4, device=device, dtype=torch.float64)
    weight_b = torch.randn(5, 4, device=device, dtype=torch.float64)

    def forward(a, b, scale):
        return scale * torch.tanh(a @ weight_a + b @ weight_b)

    a = torch.randn(6, 3, device=device, dtype=torch.float64)
    b = torch.randn(6, 5, device=device, dtype=torch.float64)
    grad_a, grad_b = ContrastSaliency(forward).attribute(
        (a, b), target=3, contrast_target=1, abs=False, additional_forward_args=2.0
    )
    a_ref, b_ref = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = forward(a_ref, b_ref, 2.0)
    torch.autograd.grad((out[:, 3] - out[:, 1]).abs().sum(), (a_ref, b_ref))
    expected = torch.autograd.grad((forward(a_ref, b_ref, 2.0)[:, 3] - forward(a_ref, b_ref, 2.0)[:, 1]).abs().sum(), (a_ref, b_ref))
    torch.testing.assert_close(grad_a, expected[0])
    torch.testing.assert_close(grad_b, expected[1])
    single = ContrastSaliency(forward).attribute((a,), additional_forward_args=(b, 2.0))
    assert isinstance(single, tuple) and len(single) == 1


def test_batch_equals_per_example(device):
    torch.manual_seed(3)
    model = small_cnn(n_classes=3).to(device).double()
    x = torch.randn(4, 1, 6, 6, device=device, dtype=torch.float64)
    targets, contrasts = [0, 1, 2, 0], [1, 2, 0, 2]
    batch = ContrastSaliency(model).attribute(x, target=targets, contrast_target=contrasts)
    for b in range(4):
        single = ContrastSaliency(model).attribute(
            x[b : b + 1], target=targets[b], contrast_target=contrasts[b]
        )
        torch.testing.assert_close(batch[b : b + 1], single, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_matches_saliency_of_hand_written_contrast(device, nt_type):
    torch.manual_seed(4)
    model = small_cnn().to(device).double()
    x = torch.randn(3, 1, 6, 6, device=device, dtype=torch.float64)

    def contrast_output(inputs):
        logits = model(inputs)
        return (logits[:, 1] - logits[:, 0]).abs()

    kwargs = dict(nt_type=nt_type, nt_samples=7, nt_samples_batch_size=3, stdevs=0.3)
    torch.manual_seed(5)
    ours = NoiseTunnel(ContrastSaliency(model)).attribute(x, target=1, **kwargs)
    torch.manual_seed(5)
    reference = NoiseTunnel(Saliency(contrast_output)).attribute(x, **kwargs)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_rows_with_target_equal_to_contrast_get_zero_maps(device):
    torch.manual_seed(7)
    model = small_cnn(n_classes=3).to(device).double()
    x = torch.randn(4, 1, 6, 6, device=device, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"target == contrast_target in 2 of the 4 rows ContrastSaliency received \(rows 1, 3;") as record:
        ours = ContrastSaliency(model).attribute(x, target=[1, 2, 0, -3], contrast_target=[0, 2, 1, 0])
    assert record[0].filename == __file__  # attributed to the caller, not to Captum
    assert not ours[[1, 3]].any()
    torch.testing.assert_close(ours[0], contrast_reference(model, x[:1], 1, 0).abs()[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[2], contrast_reference(model, x[2:3], 0, 1).abs()[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("expand", ["noise_tunnel", "sensitivity_max"])
def test_per_example_contrast_under_captum_expansion(device, expand):
    """NoiseTunnel and sensitivity_max repeat each example k times in a row."""
    torch.manual_seed(8)
    model = small_cnn(n_classes=3).to(device).double()
    x = torch.randn(3, 1, 6, 6, device=device, dtype=torch.float64)
    targets, contrasts = [1, 2, 0], [0, 1, 2]

    def contrast_output(inputs):
        logits = model(inputs)
        rows = torch.arange(len(inputs), device=device)
        repeats = len(inputs) // 3
        t = torch.tensor(targets, device=device).repeat_interleave(repeats)
        c = torch.tensor(contrasts, device=device).repeat_interleave(repeats)
        return (logits[rows, t] - logits[rows, c]).abs()

    if expand == "noise_tunnel":
        kwargs = dict(nt_samples=4, nt_samples_batch_size=3, stdevs=0.2)
        torch.manual_seed(0)
        ours = NoiseTunnel(ContrastSaliency(model)).attribute(x, target=targets, contrast_target=contrasts, **kwargs)
        torch.manual_seed(0)
        reference = NoiseTunnel(Saliency(contrast_output)).attribute(x, **kwargs)
    else:
        torch.manual_seed(0)
        ours = sensitivity_max(ContrastSaliency(model).attribute, x, target=targets, contrast_target=contrasts,
                               n_perturb_samples=4, max_examples_per_batch=9)
        torch.manual_seed(0)
        reference = sensitivity_max(Saliency(contrast_output).attribute, x, n_perturb_samples=4,
                                    max_examples_per_batch=9)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_negative_targets_index_from_the_end_as_in_captum(device):
    torch.manual_seed(9)
    model = small_cnn(n_classes=3).to(device).double()
    x = torch.randn(2, 1, 6, 6, device=device, dtype=torch.float64)
    negative = ContrastSaliency(model).attribute(x, target=-1, contrast_target=[-3, 1])
    positive = ContrastSaliency(model).attribute(x, target=2, contrast_target=[0, 1])
    torch.testing.assert_close(negative, positive, rtol=0, atol=0)


def test_contrast_list_of_another_length_is_refused_unless_target_shows_the_expansion():
    model = small_cnn()
    x = torch.randn(4, 1, 6, 6)
    with pytest.raises(ValueError, match="contrast_target has 2 entries but inputs have 4 examples. If a wrapper"):
        ContrastSaliency(model).attribute(x, target=1, contrast_target=[0, 1])
    with pytest.raises(ValueError, match="contrast_target has 2 entries but inputs have 4 examples"):
        ContrastSaliency(model).attribute(x, target=[1, 0, 1, 0], contrast_target=[0, 1])
    with pytest.raises(ValueError, match="contrast_target has 3 entries but inputs have 4 examples"):
        ContrastSaliency(model).attribute(x, target=[1, 1, 0, 0], contrast_target=[0, 1, 1])
    expanded = ContrastSaliency(model).attribute(x, target=[1, 1, 0, 0], contrast_target=[0, 1])
    explicit = ContrastSaliency(model).attribute(x, target=[1, 1, 0, 0], contrast_target=[0, 0, 1, 1])
    assert torch.equal(expanded, explicit)


def test_captum_metrics_and_visualization(device):
    torch.manual_seed(6)
    model = small_cnn().to(device)
    x = torch.randn(3, 1, 6, 6, device=device)
    explainer = ContrastSaliency(model)
    attributions = explainer.attribute(x)

    def perturb(inputs):
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    scores = infidelity(model, perturb, x, attributions, target=1)
    sensitivity = sensitivity_max(explainer.attribute, x, target=1, contrast_target=0)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert sensitivity.shape == (3,) and torch.isfinite(sensitivity).all()
    figure, _ = viz.visualize_image_attr(
        np.transpose(attributions[0].cpu().numpy(), (1, 2, 0)), method="heat_map",
        sign="absolute_value", use_pyplot=False,
    )
    assert figure is not None


def test_leaves_model_and_inputs_unchanged_also_after_error(device):
    model = small_cnn().to(device).train()
    model[1].register_forward_hook(lambda *args: None)
    x = torch.randn(2, 1, 6, 6, device=device)
    state = ModelState(model, x)
    ContrastSaliency(model).attribute(x)
    state.assert_unchanged()
    with pytest.raises(ValueError, match="target"):
        ContrastSaliency(model).attribute(x, target=7)
    state.assert_unchanged()
    assert x.grad is None


@given(
    batch=st.integers(1, 4),
    spatial=st.lists(st.integers(2, 5), min_size=1, max_size=3),
    channels=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_shape_and_dtype_follow_inputs(batch, spatial, channels, dtype):
    n_features = channels * int(np.prod(spatial))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_features, 4), torch.nn.Tanh()).to(dtype)
    x = torch.randn(batch, channels, *spatial, dtype=dtype)
    attributions = ContrastSaliency(model).attribute(x, target=3, contrast_target=1)
    assert attributions.shape == x.shape and attributions.dtype == dtype
    assert (attributions >= 0).all()
    reference = contrast_reference(model, x, 3, 1).abs()
    torch.testing.assert_close(attributions.double(), reference, rtol=1e-4, atol=1e-6)


# --- Captum's own generic Saliency configurations, with ContrastSaliency swapped in ---

SALIENCY_CONFIGS = [
    c for c in captum_configs if Saliency in c["algorithms"] and "layer" not in c
]


def _contrast_indices(output_shape, targets):
    """For each example, the first output index that is not its target."""
    indices = list(itertools.product(*(range(size) for size in output_shape[1:])))
    as_tuple = lambda t: t if isinstance(t, tuple) else (t,)
    chosen = [next(i for i in indices if i != as_tuple(t)) for t in targets]
    return [i if len(i) > 1 else i[0] for i in chosen]


def _per_example(target, batch_size):
    if isinstance(target, torch.Tensor):
        return target.tolist() if target.numel() > 1 else [int(target)] * batch_size
    return list(target) if isinstance(target, list) else [target] * batch_size


@pytest.mark.parametrize("case", SALIENCY_CONFIGS, ids=[c["name"] for c in SALIENCY_CONFIGS])
def test_captum_saliency_configs(case):
    model = case["model"]
    args = dict(case["attribute_args"])
    inputs = args.pop("inputs")
    target = args.pop("target")
    forward_args = args.get("additional_forward_args")
    inputs_tuple = inputs if isinstance(inputs, tuple) else (inputs,)
    extra = () if forward_args is None else (forward_args if isinstance(forward_args, tuple) else (forward_args,))
    output = model(*inputs_tuple, *extra)
    batch_size = output.shape[0]
    targets = _per_example(target, batch_size)
    # Per-example contrasts: under NoiseTunnel they are expanded like `target`, which
    # must then be per example too for the expansion to show.
    contrasts = _contrast_indices(output.shape, targets)
    single_target = not isinstance(target, list) and not (isinstance(target, torch.Tensor) and target.numel() > 1)
    if case.get("noise_tunnel", False) and single_target:
        with pytest.raises(ValueError, match="give target per example too"):
            NoiseTunnel(ContrastSaliency(model)).attribute(inputs, target=target, contrast_target=contrasts, **args)
        return

    def select(out, index):
        return torch.stack([out[(b, *(i if isinstance(i, tuple) else (i,)))] for b, i in enumerate(index)])

    def contrast_output(*call_args):
        out = model(*call_args)
        return (select(out, targets) - select(out, contrasts)).abs()

    if case.get("noise_tunnel", False):
        torch.manual_seed(0)
        ours = NoiseTunnel(ContrastSaliency(model)).attribute(
            inputs, target=target, contrast_target=contrasts, **args
        )
        torch.manual_seed(0)
        # stdevs is 0 in Captum's NoiseTunnel configs, so each noisy copy equals the input.
        reference = Saliency(contrast_output).attribute(inputs, additional_forward_args=forward_args)
    else:
        ours = ContrastSaliency(model).attribute(inputs, target=target, contrast_target=contrasts, **args)
        reference = Saliency(contrast_output).attribute(inputs, **args)
    for ours_part, reference_part in zip(
        ours if isinstance(ours, tuple) else (ours,), reference if isinstance(reference, tuple) else (reference,)
    ):
        torch.testing.assert_close(ours_part, reference_part, rtol=1e-5, atol=1e-6)


# --- errors ---

@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(target=1, contrast_target=1), ValueError, "contrast_target must differ"),
        (dict(target=2), ValueError, "target 2 is out of range"),
        (dict(target=-3), ValueError, "target -3 is out of range"),
        (dict(contrast_target=5), ValueError, "contrast_target 5 is out of range"),
        (dict(target=(1, 0)), ValueError, "target \\(1, 0\\) is out of range"),
        (dict(target=[0, 1, 1]), ValueError, "target has 3 entries but inputs have 2"),
        (dict(target=torch.tensor([[0, 1]])), ValueError, "target as a Tensor must be 1-D"),
        (dict(target=torch.tensor([0.0, 1.0])), TypeError, "target must be an integer Tensor"),
        (dict(target=None), ValueError, "target must be given"),
        (dict(target="1"), TypeError, "target entries must be ints"),
    ],
)
def test_bad_targets(kwargs, error, match):
    model = small_cnn()
    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(error, match=match):
        ContrastSaliency(model).attribute(x, **kwargs)


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.zeros(2, 1, 6, 6, dtype=torch.int64), TypeError, "inputs must have a floating-point dtype"),
        ((torch.zeros(2, 36), torch.zeros(3, 36)), ValueError, "inputs\\[1\\] has batch size 3"),
        ((torch.zeros(2, 36), "x"), TypeError, "inputs\\[1\\] must be a Tensor"),
        ([torch.zeros(2, 36)], TypeError, "inputs must be a Tensor or a tuple"),
        (torch.zeros(0, 1, 6, 6), ValueError, "non-empty batch"),
    ],
)
def test_bad_inputs(inputs, error, match):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))
    with pytest.raises(error, match=match):
        ContrastSaliency(model).attribute(inputs)


def test_output_without_batch_dimension_is_refused():
    with pytest.raises(ValueError, match="forward_func must return a Tensor with the batch"):
        ContrastSaliency(lambda x: x.sum()).attribute(torch.randn(2, 3))
