"""GradMask stops a classifier from learning a scanner artifact instead of the lesion.

Trains a small CNN on synthetic lesion images (captum_gradmask.datasets.lesions): a
lesion decides the label, and in training every class-1 image and no class-0 image
also carries an artifact in the top-left corner, a perfect shortcut. At test the
artifact is in half the images of each class, independent of the label. Each
setting is trained over several seeds and scored by test AUC:

- baseline: cross-entropy only;
- GradMask, contrast saliency, input gradient, sq_l2 (the authors' 2018-19 code;
  the paper's eqs. 1-2 use l2);
- GradMask, expected gradients (EG) with the default reference: each image inside
  its dilated lesion mask and 0 outside it;
- GradMask, EG with healthy references: the path starts at a healthy (class-0)
  training image, drawn per example (recommended);
- GradMask at a layer (the second convolutional block, half the input's side):
  gradient x activation, and Grad-CAM; the double backward stops at that layer.

Two artifact kinds, one table section each. A smooth bright spot is answered
smoothly, so both penalties see it. A binary high-intensity marker is answered with
a saturated, flat response: its input gradient vanishes, so the gradient penalty
cannot see it (and, pushing the rest of the model flatter, does worse than no
penalty), while expected gradients, integrated along a path from a reference,
still does. The penalty applies to class-1 images (those with a lesion mask),
dilated by 2 pixels to cover the lesion's edge. Besides test AUC, the table gives
the artifact effect: how far drawing the artifact into a test image moves the
model's score, against how far a lesion moves it, i.e. how much the model still
reads the artifact. Saves a figure of integrated-gradient maps of the
baseline, the recommended and the layer-level gradient x activation model, lesion
and artifact corner outlined.

    python examples/train_gradmask.py --quick
"""

import argparse
import multiprocessing
import pathlib
import time
import warnings
from typing import NamedTuple, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from captum.attr import IntegratedGradients  # noqa: E402
from torch import nn  # noqa: E402

from captum_gradmask.datasets.lesions import (  # noqa: E402
    ARTIFACT_ZONE,
    ARTIFACTS,
    add_artifact,
    confounded_lesions,
)
from captum_gradmask.gradmask import GradMask  # noqa: E402
from captum_gradmask.metrics import relevance_mass_accuracy, roc_auc  # noqa: E402
from captum_gradmask import viz  # noqa: E402

TRAIN_CONFOUND = 1.0  # artifact in every class-1 and no class-0 training image
TEST_CONFOUND = 0.5  # artifact independent of the label
N_TRAIN = 512
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
DILATE = 2  # pixels added around the lesion mask, as the authors blurred theirs


class Setting(NamedTuple):
    name: str
    saliency: Optional[str]  # None: cross-entropy only
    weight: float  # lambda, the penalty weight, fixed for all seeds and artifacts
    healthy_references: bool = False  # expected gradients from healthy training images
    layer: Optional[int] = None  # layer saliencies: the index of the layer in small_cnn


SETTINGS = [
    Setting("baseline (cross-entropy)", None, 0.0),
    Setting("GradMask gradient", "gradient", 1.0),
    Setting("GradMask EG, masked reference", "expected_gradients", 10.0),
    Setting("GradMask EG, healthy references", "expected_gradients", 1.0, healthy_references=True),
    # Layer 5: the second block's ReLU (16x16 of 32x32). At the last block (8x8) the
    # gradient x activation penalty made the model constant for lambda >= 0.1 and did
    # nothing to the marker below (2 seeds); Grad-CAM did no better there.
    Setting("GradMask layer gradient x activation", "layer_gradient_x_activation", 3.0, layer=5),
    Setting("GradMask layer Grad-CAM", "layer_grad_cam", 1000.0, layer=5),
]
RECOMMENDED = SETTINGS[3]
FIGURE_SETTINGS = (SETTINGS[0], RECOMMENDED, SETTINGS[4])  # baseline, recommended, layer-level


def small_cnn() -> nn.Module:
    """Three convolutions with GroupNorm, global max pooling, two logits."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.GroupNorm(2, 16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )


def make_gradmask(setting, model, data):
    """The setting's GradMask on ``model`` (None for the baseline); healthy
    references are the training images without a lesion."""
    if setting.saliency is None:
        return None
    references = data.images[data.labels == 0] if setting.healthy_references else None
    layer = None if setting.layer is None else model[setting.layer]
    return GradMask(model, saliency=setting.saliency, dilate=DILATE, baselines=references, layer=layer)


def train(setting, data, n_steps, seed, device):
    """Adam on random minibatches; the penalty only on images with a lesion mask."""
    torch.manual_seed(seed)  # initial weights and the expected-gradients path points
    model = small_cnn().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    gradmask = make_gradmask(setting, model, data)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        batch = torch.randint(0, len(data.labels), (BATCH_SIZE,), generator=batches).to(device)
        images, labels = data.images[batch], data.labels[batch]
        if gradmask is None:
            loss = F.cross_entropy(model(images), labels)
        else:
            outputs, penalty = gradmask(images, data.masks[batch], has_mask=labels == 1)
            loss = F.cross_entropy(outputs, labels) + setting.weight * penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_auc(model, test_set):
    with torch.no_grad():
        logits = model(test_set.images)
    return roc_auc(logits[:, 1] - logits[:, 0], test_set.labels)


def logit_difference(model):
    """z_1 - z_0 as a one-output function, so attributions explain the decision."""
    return lambda images: model(images)[:, 1] - model(images)[:, 0]


def integrated_gradients(model, images):
    """|integrated gradients| of z_1 - z_0 from a blank image: unlike the local
    gradient, it sees a saturated response to the marker."""
    return IntegratedGradients(logit_difference(model)).attribute(images.clone(), n_steps=32).abs().detach()


def artifact_zone(images):
    """1 on the corner where the artifact is drawn."""
    zone = torch.zeros_like(images)
    side = round(ARTIFACT_ZONE * images.shape[-1])
    zone[..., :side, :side] = 1.0
    return zone


def artifact_effect(model, test_set, artifact):
    """How much the model still reads the artifact, against how much it reads the
    lesion: the mean change of z_1 - z_0 when the artifact is drawn into the test
    images that lack it, over the mean gap of z_1 - z_0 between those images with
    and without a lesion (0: the artifact is ignored; 1: it counts like a lesion)."""
    lacking = ~test_set.has_artifact
    clean, labels = test_set.images[lacking], test_set.labels[lacking]
    marked = add_artifact(clean, torch.ones(len(clean), dtype=torch.bool), artifact)
    with torch.no_grad():
        score_clean, score_marked = logit_difference(model)(clean), logit_difference(model)(marked)
    lesion_gap = score_clean[labels == 1].mean() - score_clean[labels == 0].mean()
    return ((score_marked - score_clean).mean() / lesion_gap).item()


def run_artifact(artifact, seeds, n_steps, n_test, device):
    """Test AUC and artifact effect per setting and seed, and the first seed's models
    for the figure."""
    aucs = {setting.name: [] for setting in SETTINGS}
    effects = {setting.name: [] for setting in SETTINGS}
    first_models = {}
    for seed in seeds:
        train_set = confounded_lesions(
            N_TRAIN, artifact=artifact, confound=TRAIN_CONFOUND, seed=2 * seed, device=device
        )
        test_set = confounded_lesions(
            n_test, artifact=artifact, confound=TEST_CONFOUND, seed=2 * seed + 1, device=device
        )
        for setting in SETTINGS:
            model = train(setting, train_set, n_steps, seed, device)
            aucs[setting.name].append(test_auc(model, test_set))
            effects[setting.name].append(artifact_effect(model, test_set, artifact))
            first_models.setdefault(setting.name, model)
    return aucs, effects, first_models, test_set


def run_artifact_on_one_thread(job):
    """run_artifact in a worker process: these small convolutions run fastest on one
    thread, and one thread keeps the numbers independent of the core count."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")
    return run_artifact(*job)


def print_table(results, n_seeds, settings=SETTINGS):
    print(f"\ntest AUC (artifact independent of the label at test), and the artifact effect: the "
          f"shift of z_1 - z_0 when the\nartifact is drawn in, over the shift a lesion makes (0: "
          f"ignored, 1: read like a lesion); mean +- SD over {n_seeds} seeds")
    print(f"{'artifact':8s}  {'setting':38s}{'lambda':>7s}  {'test AUC':>15s}  {'vs baseline':>11s}"
          f"  {'artifact effect':>15s}")
    for artifact, (aucs, effects) in results.items():
        baseline = torch.tensor(aucs[settings[0].name]).mean()
        for setting in settings:
            values, effect = torch.tensor(aucs[setting.name]), torch.tensor(effects[setting.name])
            print(f"{artifact:8s}  {setting.name:38s}{setting.weight:7.1f}  "
                  f"{values.mean():7.3f} +- {_sd(values):5.3f}  {values.mean() - baseline:+11.3f}"
                  f"  {effect.mean():7.2f} +- {_sd(effect):5.2f}")


def _sd(values):
    return values.std() if len(values) > 1 else torch.tensor(0.0)


def save_figure(path, figure_data, n_shown=4):
    """Per artifact, one row of test images with the artifact and a lesion, then one
    row of |integrated gradients| of z_1 - z_0 per model of FIGURE_SETTINGS that was
    trained, each row on its own colour scale and each panel titled with its share of
    attribution in the lesion (lime contour) and on the artifact's corner (orange)."""
    some_models = next(iter(figure_data.values()))[0]
    trained = [setting for setting in FIGURE_SETTINGS if setting.name in some_models]
    rows_per_artifact = 1 + len(trained)
    figure, axes = plt.subplots(len(figure_data) * rows_per_artifact, n_shown,
                                figsize=(2.2 * n_shown + 1, 2.2 * len(figure_data) * rows_per_artifact),
                                squeeze=False, layout="constrained")
    figure.suptitle("lime contour: the lesion; orange: the corner where the artifact is drawn; "
                    "one colour scale per row", fontsize=9)
    for block, (artifact, (models, test_set)) in enumerate(figure_data.items()):
        top = rows_per_artifact * block
        shown = (test_set.labels == 1) & test_set.has_artifact
        images, masks = test_set.images[shown][:n_shown], test_set.masks[shown][:n_shown]
        zones = artifact_zone(images)
        for column, axis in enumerate(axes[top]):
            artist = viz.show(axis, images[column], masks=[masks[column], zones[column]],
                              title=f"{artifact}: test image")
        figure.colorbar(artist, ax=list(axes[top]), shrink=0.8, label="intensity")
        for offset, setting in enumerate(trained, start=1):
            maps = integrated_gradients(models[setting.name], images)
            in_lesion = relevance_mass_accuracy(maps, masks)
            on_artifact = relevance_mass_accuracy(maps, zones)
            scale = viz.shared_scale([maps], signed=False)
            name = f"model: {setting.name.split(' (')[0]}\n|integrated gradients|"
            for column, axis in enumerate(axes[top + offset]):
                artist = viz.show(axis, overlay=maps[column], masks=[masks[column], zones[column]], scale=scale,
                                  title=f"{name}\nlesion {in_lesion[column]:.2f}, artifact {on_artifact[column]:.2f}")
                axis.title.set_fontsize(7)
            figure.colorbar(artist, ax=list(axes[top + offset]), shrink=0.8, label="|attribution|")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, fewer steps and test images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3 with --quick, else 8)")
    parser.add_argument("--out", default="outputs/train_gradmask.png")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning, module="captum")

    start = time.perf_counter()
    n_seeds = args.seeds or (3 if args.quick else 8)
    n_steps = 150 if args.quick else 300
    n_test = 400 if args.quick else 1000
    jobs = [(artifact, range(n_seeds), n_steps, n_test, args.device) for artifact in ARTIFACTS]
    if args.device == "cpu":  # one process per artifact, one thread each
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            outcomes = pool.map(run_artifact_on_one_thread, jobs)
    else:
        outcomes = [run_artifact(*job) for job in jobs]
    results, figure_data = {}, {}
    for artifact, (aucs, effects, models, test_set) in zip(ARTIFACTS, outcomes):
        results[artifact] = (aucs, effects)
        figure_data[artifact] = (models, test_set)
    print(f"{N_TRAIN} training images, artifact in all class-1 and no class-0 ones; "
          f"{n_steps} steps of {BATCH_SIZE}; recommended: {RECOMMENDED.name}")
    print_table(results, n_seeds)
    out = pathlib.Path(args.out)
    save_figure(out, figure_data)
    print(f"\nfigure: {out}   total time {time.perf_counter() - start:.1f} s on {args.device}")


if __name__ == "__main__":
    main()
