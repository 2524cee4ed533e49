"""GradMask and MC-dropout uncertainty on 3-D volumes, the MONAI way.

Data: the MNI152 T1 template that ships with nilearn, resampled to a small cube, with
a synthetic lesion (a bright 3-D blob in brain tissue) in half of the volumes and a
scanner-like confound: a line of bright dots along one edge of the volume, present
with the lesion in 90% of the training volumes and at random in the test volumes.
Volumes go through a MONAI ``Dataset`` with dict transforms (random noise, typing)
and a ``DataLoader`` that batches them as MetaTensors.

1. GradMask: a MONAI 3-D DenseNet is trained with plain cross-entropy and with the
   GradMask penalty (contrast, expected gradients with healthy volumes as references)
   on the lesion masks; prints test AUC and how much each model reads the confound
   (logit change when the dots are added to the test volumes).
2. Uncertainty: a MONAI UNet with dropout segments the lesions; MCDropout gives
   per-voxel mutual information (epistemic) and expected entropy (aleatoric), once on
   whole volumes and once window by window (``mc_sliding_window_inference``), which
   agree where the window covers the volume.
A figure of slices through a test lesion goes to ``outputs/monai_volumes.png``, and a
montage of both classifiers' saliency across slices (the confound's edge, then through
the lesion) to ``outputs/monai_volumes_slices.png``.

    python examples/monai_volumes.py --quick
"""

import pathlib
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.networks import nets  # noqa: E402
from monai.transforms import Compose, EnsureTyped, RandGaussianNoised  # noqa: E402

from _common import example_arguments  # noqa: E402
from captum_gradmask import (  # noqa: E402
    GradMask,
    MCDropout,
    mc_sliding_window_inference,
    predictive_uncertainty,
    viz,
)
from captum_gradmask.datasets._common import import_optional  # noqa: E402
from captum_gradmask.metrics import roc_auc  # noqa: E402

CONFOUND_IN_TRAINING = 0.9


def template(size):
    """MNI152 (2 mm) and its brain mask, cropped to a cube and resampled: (1, s, s, s)."""
    nilearn_datasets = import_optional("nilearn.datasets")
    volume = torch.as_tensor(nilearn_datasets.load_mni152_template(resolution=2).get_fdata()).float()
    brain = torch.as_tensor(nilearn_datasets.load_mni152_brain_mask(resolution=2).get_fdata()).float()
    cube = lambda v: F.interpolate(v[None, None, :, 9:108, :], size=(size,) * 3, mode="trilinear")[0]  # noqa: E731
    brain = (cube(brain) > 0.5).float()
    return cube(volume).clamp(0, 1) * brain, brain


def synthetic_volumes(n, size, confound, seed):
    """Dicts of image, label, lesion mask and whether the confound is there."""
    image, brain = template(size)
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")).float()
    tissue = torch.nonzero((F.max_pool3d(1 - brain, 5, 1, 2) == 0)[0] & (image[0] > 0.3))
    items = []
    for index in range(n):
        label = index % 2
        has_confound = torch.rand(1, generator=generator).item() < (confound if label else 1 - confound)
        centre = tissue[torch.randint(len(tissue), (1,), generator=generator)].view(3, 1, 1, 1).float()
        radius = size / 12
        distance = ((grid - centre) ** 2).sum(0, keepdim=True).sqrt()
        mask = (distance <= radius).float() * label
        volume = image + label * 0.6 * torch.exp(-(distance / radius) ** 2) * brain
        volume = volume * (0.8 + 0.4 * torch.rand(1, generator=generator))
        if has_confound:
            volume = add_confound(volume)
        items.append({"image": volume, "label": label, "mask": mask, "confound": int(has_confound)})
    return items


def add_confound(volume):
    """Bright dots every other voxel along one edge of the volume."""
    volume = volume.clone()
    volume[..., ::2, 1, 1] = 1.0
    return volume


def loader(items, batch_size, shuffle, seed):
    transforms = Compose([
        RandGaussianNoised(keys="image", prob=1.0, std=0.02),
        EnsureTyped(keys=("image", "mask")),
    ])
    dataset = Dataset(items, transforms)
    dataset_generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=dataset_generator)


def densenet():
    return nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=8,
                         growth_rate=8, block_config=(2, 2, 2), bn_size=2)


def train_classifier(train_items, healthy, use_gradmask, epochs, device, seed):
    torch.manual_seed(seed)
    model = densenet().to(device)
    gradmask = GradMask(model, saliency="expected_gradients", baselines=healthy.to(device), dilate=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in loader(train_items, 4, True, seed):
            images, labels = batch["image"].as_tensor().to(device), batch["label"].to(device)
            masks = batch["mask"].as_tensor().to(device)
            if use_gradmask:
                outputs, penalty = gradmask(images, masks, has_mask=labels == 1)
                loss = F.cross_entropy(outputs, labels) + 10.0 * penalty
            else:
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def evaluate_classifier(model, test_items, device):
    """Test AUC, and the mean change of the lesion logit when the confound is added."""
    images = torch.stack([item["image"] for item in test_items]).to(device)
    labels = torch.tensor([item["label"] for item in test_items], device=device)
    with torch.no_grad():
        logits = model(images)
        with_dots = model(torch.stack([add_confound(v) for v in images]))
    scores = logits[:, 1] - logits[:, 0]
    effect = ((with_dots[:, 1] - with_dots[:, 0]) - scores).mean()
    return roc_auc(scores, labels), effect.item()


def train_unet(train_items, epochs, device, seed):
    torch.manual_seed(seed)
    unet = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32),
                     strides=(2, 2), dropout=0.2).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=5e-3)
    for _ in range(epochs):
        for batch in loader(train_items, 4, True, seed):
            images = batch["image"].as_tensor().to(device)
            masks = batch["mask"].as_tensor().to(device)[:, 0].long()
            loss = F.cross_entropy(unet(images), masks, weight=torch.tensor([1.0, 10.0], device=device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return unet.eval()


def save_figure(path, volume, mask, saliencies, probability, mutual_information):
    """Slices through the lesion's centre: the volume, both classifiers' saliency (each
    on its own scale), the UNet's lesion probability and mutual information; the lesion contoured."""
    plt = import_optional("matplotlib.pyplot")
    at_lesion = mask.reshape(mask.shape[-3:]).sum(dim=(0, 1)).argmax().item()
    volume, mask = volume[0], mask.reshape(1, *mask.shape[-3:])
    figure, axes = plt.subplots(1, 5, figsize=(17, 3.6), layout="constrained")
    figure.suptitle(f"slice {at_lesion} through a test lesion (lime contour)", fontsize=9)
    viz.show(axes[0], volume, masks=[mask], slice_index=at_lesion, title="volume")
    for axis, (name, saliency) in zip(axes[1:3], saliencies.items()):  # each on its own scale (7x apart)
        scale = viz.shared_scale([saliency[..., at_lesion]], signed=False)
        artist = viz.show(axis, overlay=saliency[0], masks=[mask], scale=scale, slice_index=at_lesion,
                          title=f"|saliency|,\n{name}")
        figure.colorbar(artist, ax=axis, shrink=0.8, label="|d(z_1 - z_0)/dx|")
    for axis, (name, values, unit) in zip(axes[3:], [("UNet: mean p(lesion)", probability, "probability"),
                                                     ("UNet: mutual information", mutual_information, "nats")]):
        artist = viz.show(axis, overlay=values, masks=[mask], slice_index=at_lesion, title=name)
        figure.colorbar(artist, ax=axis, shrink=0.8, label=unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_montage(path, volume, mask, saliencies):
    """Saliency of both classifiers on one scale per row, at the slice that holds the
    confound's line of dots (index 1) and at slices through the lesion."""
    plt = import_optional("matplotlib.pyplot")
    mask = mask.reshape(1, *mask.shape[-3:])
    depth = mask.shape[-1]
    at_lesion = mask.sum(dim=(0, 1, 2)).argmax().item()
    step = max(1, depth // 12)
    slices = sorted({1, *[min(max(at_lesion + k * step, 0), depth - 1) for k in (-1, 0, 1)]})
    confound = add_confound(torch.zeros_like(mask)).bool().to(mask.device)
    figure = viz.montage(volume[0].cpu(), {f"|saliency|, {name}": s[0].cpu() for name, s in saliencies.items()},
                         masks=torch.cat([mask, confound]).cpu(), slice_indices=slices,
                         colour_bar_label="|d(z_1 - z_0)/dx|")
    figure.suptitle("lime contour: the lesion; orange: the confound's dots (slice 1); one colour scale per row",
                    fontsize=9)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    args = example_arguments(__doc__, "outputs/monai_volumes.png", "smaller volumes, fewer epochs")
    warnings.filterwarnings("ignore", message="BatchNorm in training mode")
    start, device = time.perf_counter(), torch.device(args.device)
    size, n_train, epochs = (24, 48, 20) if args.quick else (32, 96, 30)
    train_items = synthetic_volumes(n_train, size, CONFOUND_IN_TRAINING, args.seed)
    test_items = synthetic_volumes(32, size, 0.5, args.seed + 1)
    healthy = torch.stack([item["image"] for item in train_items if item["label"] == 0])

    print(f"1. GradMask, MONAI DenseNet 3-D, {n_train} volumes of {size}^3, {epochs} epochs")
    print(f"{'model':<28} {'test AUC':>9} {'confound effect':>16}")
    classifiers = {}
    for name, use_gradmask in [("cross-entropy", False), ("GradMask (EG, healthy refs)", True)]:
        classifiers[name] = train_classifier(train_items, healthy, use_gradmask, epochs, device, args.seed)
        auc, effect = evaluate_classifier(classifiers[name], test_items, device)
        print(f"{name:<28} {auc:9.3f} {effect:16.3f}")

    unet = train_unet(train_items, epochs, device, args.seed)
    mc_unet = MCDropout(unet, n_samples=8, seed=args.seed)
    lesion_volume = next(item for item in test_items if item["label"] == 1)
    volume = lesion_volume["image"][None].to(device)
    with torch.no_grad():
        maps = mc_unet.uncertainty(volume, mc_samples_batch_size=4)
        windowed = predictive_uncertainty(
            mc_sliding_window_inference(mc_unet, volume, roi_size=size).softmax(dim=2)
        )
    difference = (windowed.mutual_information - maps.mutual_information).abs().max().item()
    inside = lesion_volume["mask"][0].bool().to(device)
    print(f"\n2. MC dropout, MONAI UNet 3-D, T = {mc_unet.n_samples}")
    print(f"mean mutual information inside the lesion {maps.mutual_information[0][inside].mean():.4f}, "
          f"outside {maps.mutual_information[0][~inside].mean():.4f}")
    print(f"one sliding window of the volume's size against the whole volume: largest difference {difference:.2e}")

    saliencies = {}
    for name, model in classifiers.items():
        x = volume.clone().requires_grad_()
        logits = model(x)
        (gradient,) = torch.autograd.grad(logits[0, 1] - logits[0, 0], x)
        saliencies[name] = gradient.abs()
    save_figure(pathlib.Path(args.out), volume, lesion_volume["mask"], saliencies,
                maps.mean[:, 1], maps.mutual_information)
    montage_path = pathlib.Path(args.out).with_name(pathlib.Path(args.out).stem + "_slices.png")
    save_montage(montage_path, volume, lesion_volume["mask"], saliencies)
    print(f"\nfigures: {args.out}, {montage_path}    total {time.perf_counter() - start:.1f}s on {device}")


if __name__ == "__main__":
    main()
