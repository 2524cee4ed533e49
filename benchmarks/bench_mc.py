"""MC dropout, batched over samples (MCDropout, MCAttribution) against a loop of T passes.

The loop is what baal and most MC-dropout code do: switch the dropout layers to train
mode and call the model (or the attribution method) T times. Ours replicates the batch
and runs all T sub-networks in one pass, or in chunks of ``mc_samples_batch_size``.

1. T = 20, batch 4, two small CNNs: on 1 x 28 x 28 inputs, where the cost of a pass is
   mostly per-call overhead, and on 1 x 64 x 64 inputs, where it is mostly arithmetic.
2. MONAI's UNet and SegResNet in 3-D (batch 1; needs the monai extra): prediction time
   and peak memory against the loop, all T in one pass and one per pass; the peak
   memory of the UNet's uncertainty maps at T and 4 T, one sample per pass.
3. Drawing the masks: a model of four element-wise dropout layers on 16 x 32^3
   features, so that the call is almost only masks, at T and 4 T with one sample per
   pass (the memory bound) and all in one pass.
Prints median times over repeats after warm-up and the ratios, and the peak memory of
one call (tensor memory from the PyTorch profiler on CPU, allocator peak on CUDA).

    python benchmarks/bench_mc.py [--quick]
"""

import argparse

import torch
from captum.attr import Saliency
from torch import nn

from captum_gradmask import MCAttribution, MCDropout

from _measure import interleaved_medians, peak_memory_mib

N_SAMPLES = 20
BATCH_SIZE = 4
CHUNKINGS = [None, 5, 1]  # mc_samples_batch_size; None: all T in one pass


def classifier():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(0.25),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(32, 2),
    )


def setup(side, device):
    torch.manual_seed(0)
    model = classifier().to(device).eval()
    images = torch.randn(BATCH_SIZE, 1, side, side, device=device)
    return model, images


class DropoutOn:
    """The usual MC-dropout switch: dropout layers in train mode, the rest in eval."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]

    def __enter__(self):
        for layer in self.layers:
            layer.train()

    def __exit__(self, *exception):
        for layer in self.layers:
            layer.eval()


def loop_predict(model, images, n_samples=N_SAMPLES):
    with DropoutOn(model), torch.no_grad():
        return torch.stack([model(images) for _ in range(n_samples)])


def loop_saliency(model, images):
    saliency = Saliency(model)
    images = images.detach().requires_grad_()
    with DropoutOn(model):
        return torch.stack([saliency.attribute(images, target=1) for _ in range(N_SAMPLES)]).mean(0)


def batched_predict(mc_model, images, chunk):
    with torch.no_grad():
        return mc_model(images, mc_samples_batch_size=chunk)


def batched_saliency(mc_model, images, chunk):
    return MCAttribution(Saliency, mc_model).attribute(
        images, target=1, mc_samples_batch_size=chunk
    )


def bench_small_cnns(args, device):
    print(
        f"1. T = {N_SAMPLES}, batch {BATCH_SIZE}, small CNN\n"
        f"{'inputs':<9} {'task':<11} {'loop (ms)':>10} "
        + " ".join(
            f"{'batched ' + str(chunk or N_SAMPLES) + ' (ms)':>19}" for chunk in CHUNKINGS[:2]
        )
        + f" {'speed-up':>9}"
    )
    for side in (28,) if args.quick else (28, 64):
        model, images = setup(side, device)
        mc_model = MCDropout(model, N_SAMPLES)
        for task, loop, batched in [
            ("prediction", loop_predict, batched_predict),
            ("saliency", loop_saliency, batched_saliency),
        ]:
            calls = {"loop": lambda: loop(model, images)}
            for chunk in CHUNKINGS[:2]:
                calls[chunk] = lambda chunk=chunk: batched(mc_model, images, chunk)
            medians = interleaved_medians(calls, args.repeats, device)
            loop_time = 1e3 * medians.pop("loop")
            batched_times = [1e3 * seconds for seconds in medians.values()]
            print(
                f"{side}x{side:<6} {task:<11} {loop_time:10.2f} "
                + " ".join(f"{t:19.2f}" for t in batched_times)
                + f" {loop_time / min(batched_times):8.2f}x"
            )

    side = 28 if args.quick else 64
    model, images = setup(side, device)
    mc_model = MCDropout(model, N_SAMPLES)
    print(
        f"\npeak memory of one call, {side}x{side} inputs (MiB); batched with "
        f"mc_samples_batch_size = {CHUNKINGS}"
    )
    for task, loop, batched in [
        ("prediction", loop_predict, batched_predict),
        ("saliency", loop_saliency, batched_saliency),
    ]:
        loop_memory = peak_memory_mib(lambda: loop(model, images), device)
        batched_memory = [
            peak_memory_mib(lambda: batched(mc_model, images, c), device) for c in CHUNKINGS
        ]
        print(
            f"{task:<11} loop {loop_memory:7.1f}   batched "
            + "  ".join(f"{m:7.1f}" for m in batched_memory)
        )


def monai_networks():
    from monai.networks import nets

    return {
        "UNet 3-D": nets.UNet(
            spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), dropout=0.2
        ),
        "SegResNet 3-D": nets.SegResNet(
            spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, dropout_prob=0.2
        ),
    }


def bench_monai(args, device):
    try:
        monai_networks()
    except ImportError:
        print("\n2. skipped: MONAI is not installed (pip install captum-gradmask[monai])")
        return
    n_samples, side = (4, 32) if args.quick else (8, 48)
    print(
        f"\n2. MONAI, T = {n_samples}, batch 1, 1 x {side}^3, prediction; time (ms) and peak "
        "memory (MiB)"
    )
    print(f"{'network':<14} {'loop ms / MiB':>14} {'batched T':>14} {'batched 1':>14}  speed-up  memory vs loop")
    torch.manual_seed(0)
    volume = torch.randn(1, 1, side, side, side, device=device)
    for name, model in monai_networks().items():
        model = model.to(device).eval()
        mc_model = MCDropout(model, n_samples)
        calls = {
            "loop": lambda: loop_predict(model, volume, n_samples),
            None: lambda: batched_predict(mc_model, volume, None),
            1: lambda: batched_predict(mc_model, volume, 1),
        }
        medians = interleaved_medians(calls, args.repeats, device)
        memory = {key: peak_memory_mib(call, device) for key, call in calls.items()}
        cells = [f"{1e3 * medians[k]:7.0f} {memory[k]:6.1f}" for k in calls]
        print(
            f"{name:<14} " + " ".join(f"{cell:>14}" for cell in cells)
            + f"  {medians['loop'] / medians[None]:7.2f}x  {memory[1] / memory['loop']:5.2f}x (one per pass)"
        )
    unet = monai_networks()["UNet 3-D"].to(device).eval()
    peaks = []
    for count in (n_samples, 4 * n_samples):
        mc_model = MCDropout(unet, count)
        with torch.no_grad():
            peaks.append(peak_memory_mib(lambda: mc_model.uncertainty(volume, mc_samples_batch_size=1), device))
    print(
        f"UNet 3-D uncertainty, one sample per pass: peak {peaks[0]:.1f} MiB at T = {n_samples}, "
        f"{peaks[1]:.1f} MiB at T = {4 * n_samples} ({peaks[1] / peaks[0]:.2f}x)"
    )


def bench_mask_drawing(args, device):
    """Element-wise dropout layers and a global mean: the call is almost only masks."""
    n_samples = 4 if args.quick else 8
    layers = [nn.Dropout(0.2) for _ in range(4)] + [nn.AdaptiveAvgPool3d(1), nn.Flatten()]
    model = nn.Sequential(*layers).to(device).eval()
    features = torch.zeros(1, 16, 32, 32, 32, device=device)
    print("\n3. masks of 4 element-wise dropout layers on 16 x 32^3 features; ms and MiB per call")
    rows = []
    for count, chunk in [(n_samples, 1), (4 * n_samples, 1), (4 * n_samples, None)]:
        mc_model = MCDropout(model, count)
        call = lambda: batched_predict(mc_model, features, chunk)  # noqa: E731
        seconds = interleaved_medians({"call": call}, args.repeats, device)["call"]
        rows.append((count, chunk, 1e3 * seconds, peak_memory_mib(call, device)))
    for count, chunk, milliseconds, memory in rows:
        print(f"T = {count:<3} mc_samples_batch_size = {str(chunk):<5} {milliseconds:8.1f} ms {memory:8.1f} MiB")
    print(f"peak memory at 4x the samples, one per pass: {rows[1][3] / rows[0][3]:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="small inputs, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 3
    device = torch.device(args.device)
    print(
        f"{device}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved "
        "runs after warm-up\n"
    )
    bench_small_cnns(args, device)
    bench_monai(args, device)
    bench_mask_drawing(args, device)


if __name__ == "__main__":
    main()
