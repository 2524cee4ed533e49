"""MC-dropout uncertainty maps for vessel segmentation, beside saliency mean and spread.

After Seo (2019), on synthetic retinal images (captum_gradmask.datasets.vessels):
trains a small U-Net with dropout to segment vessels and a small classifier to detect
lesions, then uses T = 20 dropout sub-networks (MCDropout) for
  - per-pixel epistemic (mutual information) and aleatoric (expected entropy) maps;
  - the AUROC of an image's mean mutual information for telling shifted images
    (stronger noise, inverted vessel contrast) from in-distribution ones;
  - the mean and spread over sub-networks of the classifier's saliency
    (MCAttribution(Saliency)).
Prints a table and saves a figure.

    python examples/uncertainty_maps.py --quick
"""

import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from captum.attr import Saliency  # noqa: E402
from torch import nn  # noqa: E402

from _common import example_arguments  # noqa: E402
from captum_gradmask.datasets.vessels import synthetic_vessels  # noqa: E402
from captum_gradmask import MCAttribution, MCDropout, viz  # noqa: E402

IN_DISTRIBUTION = {"noise_std": 0.03, "vessel_contrast": 0.3}
SHIFTS = {
    "stronger noise": {"noise_std": 0.08, "vessel_contrast": 0.3},
    "inverted contrast": {"noise_std": 0.03, "vessel_contrast": -0.3},
}


def conv_block(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(),
    )


class SmallUNet(nn.Module):
    """Two-level U-Net, channel dropout on the deeper features; two-class logits."""

    def __init__(self, channels=8, dropout=0.25):
        super().__init__()
        self.down1 = conv_block(1, channels)
        self.down2 = conv_block(channels, 2 * channels)
        self.bottom = conv_block(2 * channels, 4 * channels)
        self.up2 = conv_block(6 * channels, 2 * channels)
        self.up1 = conv_block(3 * channels, channels)
        self.head = nn.Conv2d(channels, 2, 1)
        self.dropout_down2 = nn.Dropout2d(dropout)
        self.dropout_bottom = nn.Dropout2d(dropout)
        self.dropout_up2 = nn.Dropout2d(dropout)

    def forward(self, x):
        down1 = self.down1(x)
        down2 = self.dropout_down2(self.down2(F.max_pool2d(down1, 2)))
        bottom = self.dropout_bottom(self.bottom(F.max_pool2d(down2, 2)))
        up2 = self.dropout_up2(
            self.up2(torch.cat([F.interpolate(bottom, scale_factor=2.0), down2], 1))
        )
        up1 = self.up1(torch.cat([F.interpolate(up2, scale_factor=2.0), down1], 1))
        return self.head(up1)


def lesion_classifier(dropout=0.25):
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Dropout2d(dropout),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(32, 2),
    )


def train(model, images, labels, steps, seed, class_weights=None):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (16,), generator=generator).to(images.device)
        loss = F.cross_entropy(model(images[batch]), labels[batch], weight=class_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


def auroc(negative_scores, positive_scores):
    """Area under the ROC curve as the rank statistic P(positive > negative), ties 1/2."""
    difference = positive_scores.view(-1, 1) - negative_scores.view(1, -1)
    return ((difference > 0).double() + 0.5 * (difference == 0).double()).mean().item()


def dice(predicted, truth):
    return (2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())).item()


def mean_inside(maps, field_of_view):
    """Per-image mean of a (N, H, W) map over the field of view."""
    return (maps * field_of_view).sum(dim=(1, 2)) / field_of_view.sum(dim=(1, 2))


def train_models(train_set, steps, seed, device):
    segmenter = SmallUNet().to(device)
    # Vessels are ~9% of the pixels: weighting them keeps brief training from
    # settling on "all background".
    vessel_weights = torch.tensor([1.0, 3.0], device=device)
    vessel_labels = train_set.vessels[:, 0].long()
    segmentation_loss = train(
        segmenter, train_set.images, vessel_labels, steps, seed, vessel_weights
    )
    classifier = lesion_classifier().to(device)
    classifier_loss = train(classifier, train_set.images, train_set.labels, steps, seed + 1)
    print(f"final training loss: U-Net {segmentation_loss:.3f}, classifier {classifier_loss:.3f}")
    return segmenter, classifier


def evaluate(test_set, mc_segmenter, mc_classifier):
    """Uncertainty maps and one table row (without AUROC) for one test set."""
    field_of_view = test_set.images[:, 0] != 0
    with torch.no_grad():
        maps = mc_segmenter.uncertainty(test_set.images, mc_samples_batch_size=5)
        lesion_probability = mc_classifier.uncertainty(test_set.images).mean[:, 1]
    lesion_predictions = (lesion_probability > 0.5).long()
    row = {
        "Dice": dice(maps.mean[:, 1] > 0.5, test_set.vessels[:, 0]),
        "lesion acc": (lesion_predictions == test_set.labels).double().mean().item(),
        "mean MI": mean_inside(maps.mutual_information, field_of_view),
        "mean E[H]": mean_inside(maps.expected_entropy, field_of_view),
    }
    return maps, row


def print_table(rows):
    columns = ["Dice", "lesion acc", "mean MI", "mean E[H]", "AUROC(MI)"]
    print(f"\n{'test set':<18}" + "".join(f"{column:>11}" for column in columns))
    for name, row in rows.items():
        cells = [row["Dice"], row["lesion acc"], row["mean MI"].mean().item()]
        cells += [row["mean E[H]"].mean().item(), row.get("AUROC(MI)")]
        print(f"{name:<18}" + "".join(" " * 11 if c is None else f"{c:11.4f}" for c in cells))


def save_figure(test_sets, maps, saliency, out):
    """Rows: the test sets; columns: the image and five maps, each map column on one
    colour scale across the test sets (so a shift's higher uncertainty shows), with its
    labelled colour bar; the image's lesions contoured on the saliency maps."""
    columns = [
        ("image", ""), ("U-Net: P(vessel), mean over T", "probability"),
        ("epistemic: mutual information", "nats"), ("aleatoric: expected entropy", "nats"),
        ("classifier |Saliency|, mean over T", "|gradient|"), ("classifier |Saliency|, SD over T", "|gradient|"),
    ]
    rows, lesions = {}, {}
    for name, test_set in test_sets.items():
        index = int(test_set.labels.argmax())  # the first image with lesions
        image = test_set.images[index : index + 1]
        mean, spread = saliency.attribute(image, target=1, return_std=True)
        uncertainty = maps[name]
        rows[name] = [image[0], uncertainty.mean[index, 1:2], uncertainty.mutual_information[index : index + 1],
                      uncertainty.expected_entropy[index : index + 1], mean[0], spread[0]]
        lesions[name] = test_set.lesions[index]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(17, 2.7 * len(rows)), squeeze=False,
                                layout="constrained")
    figure.suptitle(f"T = {saliency.mc_model.n_samples} dropout sub-networks; lime contour: the image's lesions",
                    fontsize=9)
    for column, (title, unit) in enumerate(columns):
        panels = [row[column] for row in rows.values()]
        scale = viz.shared_scale(panels, signed=False)
        for row, (name, panel) in enumerate(zip(rows, panels)):
            if column == 0:
                artist = viz.show(axes[row, 0], image=panel, title=name)
            else:
                contours = [lesions[name]] if column >= 4 else []
                artist = viz.show(axes[row, column], overlay=panel, masks=contours, scale=scale,
                                  title=title if row == 0 else None)
        if column > 0:
            figure.colorbar(artist, ax=axes[:, column].tolist(), shrink=0.7, label=unit)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out


def main():
    args = example_arguments(__doc__, "outputs/uncertainty_maps.png", "less data and training")
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    n_train, n_test, steps = (256, 48, 200) if args.quick else (384, 128, 400)

    def data(n_images, seed, style):
        return synthetic_vessels(
            n_images, seed=seed, device=args.device, lesion_probability=0.5, **style
        )

    segmenter, classifier = train_models(
        data(n_train, args.seed, IN_DISTRIBUTION), steps, args.seed, args.device
    )
    mc_segmenter = MCDropout(segmenter, n_samples=20, seed=args.seed)
    mc_classifier = MCDropout(classifier, n_samples=20, seed=args.seed)
    test_sets = {"in distribution": data(n_test, args.seed + 100, IN_DISTRIBUTION)}
    for offset, (name, style) in enumerate(SHIFTS.items()):
        test_sets[name] = data(n_test, args.seed + 200 + offset, style)

    maps, rows = {}, {}
    for name, test_set in test_sets.items():
        maps[name], rows[name] = evaluate(test_set, mc_segmenter, mc_classifier)
    for name in SHIFTS:
        # AUROC of the image's mean MI: shifted images positive, in-distribution negative.
        rows[name]["AUROC(MI)"] = auroc(rows["in distribution"]["mean MI"], rows[name]["mean MI"])
    print_table(rows)

    out = save_figure(test_sets, maps, MCAttribution(Saliency, mc_classifier), args.out)
    print(f"\nfigure: {out}    total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
