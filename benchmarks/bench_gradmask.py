"""Training-step time and peak memory of GradMask against a hand-written penalty.

One training step (forward, loss, backward, optimizer step) of nine losses:

    ce          plain cross-entropy
    hand        cross-entropy + a double-backprop GradMask penalty written by hand
                (what users write today; the reference of the ratios)
    exact       cross-entropy + GradMask(model, method="exact")
    forward     cross-entropy + GradMask(model, method="forward_mode")
    finite_diff cross-entropy + GradMask(model, method="finite_difference")
    expected_gr cross-entropy + GradMask(model, saliency="expected_gradients")
    gxa half    cross-entropy + GradMask(model, saliency="layer_gradient_x_activation",
                layer=the first layer at half the input's side, after the stem)
    gxa mid     the same at a middle layer (1/8 of the side on the big networks)
    gxa last    the same at the last layer before global pooling (1/32)
    cam last    saliency="layer_grad_cam" at the last layer

on a small GroupNorm CNN (2-D 1x48x48, batch 32, and 3-D 1x32^3, batch 4), and at
the sizes of MONAI's networks, in training mode (BatchNorm with batch statistics):
DenseNet121 2-D (1x128x128, batch 4) and ResNet-18 3-D (1x64^3, batch 2), built in
benchmarks/_networks.py, and MONAI's own DenseNet121 3-D (1x64^3, batch 2; when
MONAI is installed). Steps run in turn within each repeat, so load from other
processes hits them alike; medians after one warm-up round. Peak memory of one
step: on CUDA the allocator peak above what was live before the step; on CPU the
peak of the tensor memory allocated during the step and not yet freed, a running
sum over the allocation and free events that the PyTorch profiler records. Ratios
are printed against the hand-written step and against plain cross-entropy. Last,
finite_difference and plain cross-entropy on a torch.compile'd small CNN: compile
time, step times against eager, and the penalty.

    python benchmarks/bench_gradmask.py           # about 15 min on 2 idle CPU cores
    python benchmarks/bench_gradmask.py --quick   # small 2-D CNN only, under a minute
    python benchmarks/bench_gradmask.py --models "ResNet-18 3-D"

One CPU thread by default (--threads): on a CPU shared with other jobs, with two
threads every operation waits for both and a busy core stalls it; measured here,
that swung the ratios by 2x between runs.
"""

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from captum_gradmask.gradmask import GradMask

from _measure import interleaved_medians, peak_memory_mib, synchronize
from _networks import densenet, resnet

PENALTY_WEIGHT = 10.0
LOSSES = ["ce", "hand", "exact", "forward", "finite_diff", "expected_gr", "gxa half", "gxa mid", "gxa last",
          "cam last"]


# --- models ---


def conv_block(dims, in_channels, out_channels):
    conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    return [conv(in_channels, out_channels, 3, padding=1), nn.GroupNorm(8, out_channels), nn.ReLU()]


def small_cnn(dims):
    pool = (nn.MaxPool2d, nn.MaxPool3d)[dims - 2]
    average = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)[dims - 2]
    return nn.Sequential(
        *conv_block(dims, 1, 16), pool(2),
        *conv_block(dims, 16, 32), pool(2),
        *conv_block(dims, 32, 64),
        average(1), nn.Flatten(), nn.Linear(64, 2),
    )


def monai_densenet121_3d():
    from monai.networks import nets  # an optional extra

    return nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)


# name: (model, input shape of one example, batch size, default repeats,
#        model -> (layer at half the side, middle layer, last layer before global pooling))
MODELS = {
    "small CNN 2-D": (lambda: small_cnn(2), (1, 48, 48), 32, 30, lambda m: (m[6], m[7], m[-4])),
    "small CNN 3-D": (lambda: small_cnn(3), (1, 32, 32, 32), 4, 30, lambda m: (m[6], m[7], m[-4])),
    # DenseNet: the stem's ReLU (1/2), the end of dense block 2 (1/8), the last ReLU (1/32)
    "DenseNet121 2-D": (lambda: densenet(2), (1, 128, 128), 4, 5, lambda m: (m[2], m[25], m[-4])),
    # ResNet-18: the stem's ReLU (1/2), the end of stage 2 (1/8) and of stage 4 (1/32)
    "ResNet-18 3-D": (lambda: resnet(3), (1, 64, 64, 64), 2, 5, lambda m: (m[2], m[7], m[11])),
    "MONAI DenseNet121 3-D": (
        monai_densenet121_3d, (1, 64, 64, 64), 2, 5,
        lambda m: (m.features.relu0, m.features.denseblock2, m.class_layers.relu),
    ),
}


def make_batch(shape, batch_size, device):
    """Random images, labels and a lesion mask: a centred box of half the side."""
    images = torch.randn(batch_size, *shape, device=device)
    labels = torch.randint(0, 2, (batch_size,), device=device)
    mask = torch.zeros(batch_size, *shape, device=device)
    box = [slice(None), slice(None)] + [slice(side // 4, side // 4 + side // 2) for side in shape[1:]]
    mask[tuple(box)] = 1.0
    return images, labels, mask


# --- the losses ---


def hand_written_penalty(model, images, mask):
    x = images.detach().requires_grad_()
    logits = model(x)
    saliency = (logits[:, 1] - logits[:, 0]).abs()
    (gradient,) = torch.autograd.grad(saliency.sum(), x, create_graph=True)
    return logits, ((1 - mask) * gradient).pow(2).flatten(1).sum(1).mean()


def hand_written_loss(model, images, labels, mask):
    logits, penalty = hand_written_penalty(model, images, mask)
    return F.cross_entropy(logits, labels) + PENALTY_WEIGHT * penalty


def gradmask_loss(gradmask, images, labels, mask):
    outputs, penalty = gradmask(images, mask)
    return F.cross_entropy(outputs, labels) + PENALTY_WEIGHT * penalty


def loss_functions(model, half_layer, middle_layer, last_layer):
    """name -> (images, labels, mask) -> loss, for the names in LOSSES."""
    gradient_x_activation = "layer_gradient_x_activation"
    ours = {
        "gxa half": GradMask(model, saliency=gradient_x_activation, layer=half_layer),
        "exact": GradMask(model, method="exact"),
        "forward": GradMask(model, method="forward_mode"),
        "finite_diff": GradMask(model, method="finite_difference"),
        "expected_gr": GradMask(model, saliency="expected_gradients"),
        "gxa mid": GradMask(model, saliency=gradient_x_activation, layer=middle_layer),
        "gxa last": GradMask(model, saliency=gradient_x_activation, layer=last_layer),
        "cam last": GradMask(model, saliency="layer_grad_cam", layer=last_layer),
    }
    functions = {
        "ce": lambda images, labels, mask: F.cross_entropy(model(images), labels),
        "hand": lambda images, labels, mask: hand_written_loss(model, images, labels, mask),
    }
    for name, gradmask in ours.items():
        functions[name] = lambda images, labels, mask, gradmask=gradmask: gradmask_loss(
            gradmask, images, labels, mask
        )
    return functions


def training_step(loss_function, optimizer, batch):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_function(*batch).backward()
        optimizer.step()

    return step


# --- measurement ---


def milliseconds(seconds_by_name):
    return {name: 1e3 * seconds for name, seconds in seconds_by_name.items()}


def output_side(model, layer, images):
    """The spatial shape of ``layer``'s output, as "16x16"."""
    shapes = []
    handle = layer.register_forward_hook(lambda module, args, output: shapes.append(output.shape[2:]))
    with torch.no_grad():
        model(images)
    handle.remove()
    return "x".join(map(str, shapes[0]))


def benchmark_model(name, device, repeats):
    build, shape, batch_size, default_repeats, layers_of = MODELS[name]
    repeats = repeats or default_repeats
    torch.manual_seed(0)
    model = build().to(device)
    # lr 0: the optimizer step runs, the weights stay, so every loss is timed at the
    # same weights (random data would otherwise drive them to overflow).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    batch = make_batch(shape, batch_size, device)
    half_layer, middle_layer, last_layer = layers_of(model)
    steps = {
        loss: training_step(function, optimizer, batch)
        for loss, function in loss_functions(model, half_layer, middle_layer, last_layer).items()
    }
    times = milliseconds(interleaved_medians(steps, repeats, device))
    memory = {loss: peak_memory_mib(step, device) for loss, step in steps.items()}
    sides = {label: output_side(model, layer, batch[0])
             for label, layer in [("half", half_layer), ("mid", middle_layer), ("last", last_layer)]}
    print(f"\n{name}: {batch_size} x {'x'.join(map(str, shape))}, median of {repeats}; layer maps: "
          + ", ".join(f"{label} {side}" for label, side in sides.items()))
    print(
        f"{'loss':<12} {'step (ms)':>10} {'vs hand':>8} {'vs ce':>7} "
        f"{'peak (MiB)':>11} {'vs hand':>8} {'vs ce':>7}"
    )
    for loss in LOSSES:
        print(
            f"{loss:<12} {times[loss]:10.1f} {times[loss] / times['hand']:7.2f}x "
            f"{times[loss] / times['ce']:6.2f}x {memory[loss]:11.1f} "
            f"{memory[loss] / memory['hand']:7.2f}x {memory[loss] / memory['ce']:6.2f}x"
        )


def check_same_penalty(device):
    """GradMask's penalty equals the hand-written one with every method."""
    torch.manual_seed(0)
    model = small_cnn(2).to(device)
    images, _, mask = make_batch((1, 48, 48), 8, device)
    _, hand = hand_written_penalty(model, images, mask)
    for method in ["exact", "forward_mode", "finite_difference"]:
        ours = GradMask(model, method=method)(images, mask).penalty
        torch.testing.assert_close(ours, hand, rtol=1e-5, atol=0)


def benchmark_compiled(device, repeats):
    """finite_difference and plain cross-entropy with a torch.compile'd small CNN,
    against the eager model: the compiled/eager ratio of plain cross-entropy shows
    what compilation itself gains or loses on this device."""
    _, shape, batch_size, default_repeats, _ = MODELS["small CNN 2-D"]
    repeats = repeats or default_repeats
    torch.manual_seed(0)
    model = small_cnn(2).to(device)
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    batch = make_batch(shape, batch_size, device)
    gradmasks = {
        "eager": GradMask(model, method="finite_difference"),
        "compiled": GradMask(compiled, method="finite_difference"),
    }
    start = time.perf_counter()
    training_step(lambda *b: gradmask_loss(gradmasks["compiled"], *b), optimizer, batch)()
    synchronize(device)
    compile_seconds = time.perf_counter() - start
    steps = {}
    for mode, network in [("eager", model), ("compiled", compiled)]:
        steps[f"ce {mode}"] = training_step(
            lambda images, labels, mask, network=network: F.cross_entropy(network(images), labels),
            optimizer, batch,
        )
        steps[f"finite_diff {mode}"] = training_step(
            lambda *b, gradmask=gradmasks[mode]: gradmask_loss(gradmask, *b), optimizer, batch
        )
    times = milliseconds(interleaved_medians(steps, repeats, device))
    penalties = {mode: gradmask(batch[0], batch[2]).penalty.item() for mode, gradmask in gradmasks.items()}
    print(f"\ntorch.compile, small CNN 2-D, median of {repeats}")
    print(f"first finite_difference step with the compiled model (compiles): {compile_seconds:.1f} s")
    print(f"penalty compiled {penalties['compiled']:.6g} vs eager {penalties['eager']:.6g}")
    for loss in ["ce", "finite_diff"]:
        eager, compiled_time = times[f"{loss} eager"], times[f"{loss} compiled"]
        print(
            f"{loss:<12} step compiled {compiled_time:7.1f} ms vs eager {eager:7.1f} ms "
            f"({compiled_time / eager:.2f}x)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: per model, 8 to 30")
    parser.add_argument("--quick", action="store_true", help="small 2-D CNN only, 5 repeats")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None, metavar="NAME",
                        help=f"only these models (default: all): {list(MODELS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else None)
    names = args.models or (["small CNN 2-D"] if args.quick else list(MODELS))
    print(f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, penalty weight {PENALTY_WEIGHT}")
    # Known here: the models train in training mode (BatchNorm's batch statistics)
    # and finite_difference is inexact on ReLU nets (accuracy_gradmask_methods.py).
    warnings.filterwarnings("ignore", message="BatchNorm in training mode")
    warnings.filterwarnings("ignore", message="method='finite_difference'")
    check_same_penalty(device)
    print("penalty of every method = hand-written (rtol 1e-5)")
    for name in names:
        try:
            benchmark_model(name, device, repeats)
        except ImportError as error:  # MONAI is an optional extra
            print(f"\n{name}: skipped ({error})")
    benchmark_compiled(device, repeats)


if __name__ == "__main__":
    main()
