"""Offline data sets: Decoy Digits, synthetic crosses, brain slices.

For each: shapes, dtypes and devices; a seed gives the same data and the global
random state is untouched; the confound goes with the label in training and not
at test; masks cover what they should; and the task can be learned from the right
reason (a small model trained without the confound beats chance at test).
"""

import sys

import pytest
import torch
import torch.nn as nn

from captum_gradmask.datasets._common import import_optional
from captum_gradmask.datasets.brain_slices import brain_slices
from captum_gradmask.datasets.crosses import crosses
from captum_gradmask.datasets.decoy_digits import (
    BINARY_CLASSES,
    DECOY_PAIR,
    DECOY_SWATCH,
    decoy_digits,
    swatch_shades,
)

pytest.importorskip("sklearn")
pytest.importorskip("nilearn")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

GENERATORS = {
    "decoy_digits": lambda n, **kwargs: decoy_digits(n, classes=BINARY_CLASSES, **kwargs),
    "crosses": crosses,
    "brain_slices": brain_slices,
}
SIZES = {"decoy_digits": 16, "crosses": 28, "brain_slices": 64}


# --- common contract ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(GENERATORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_device(name, dtype, device):
    data = GENERATORS[name](12, split="train", seed=0, device=device, dtype=dtype)
    size = SIZES[name]
    assert data.images.shape == data.masks.shape == (12, 1, size, size)
    assert data.labels.shape == (12,)
    assert data.images.dtype == data.masks.dtype == dtype
    assert data.labels.dtype == torch.long
    for tensor in data:
        assert tensor.device.type == torch.device(device).type
    assert ((data.masks == 0) | (data.masks == 1)).all()


@pytest.mark.parametrize("name", list(GENERATORS))
def test_seed_reproducible_and_global_rng_untouched(name):
    generate = GENERATORS[name]
    rng_state = torch.get_rng_state()
    first = generate(20, split="train", seed=3)
    again = generate(20, split="train", seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    other_seed = generate(20, split="train", seed=4)
    other_split = generate(20, split="test", seed=3)
    assert not torch.equal(first.images, other_seed.images)
    assert not torch.equal(first.masks, other_split.masks)


@pytest.mark.parametrize("name", list(GENERATORS))
def test_rejects_bad_arguments(name):
    generate = GENERATORS[name]
    with pytest.raises(ValueError, match="split"):
        generate(4, split="validation")
    with pytest.raises(ValueError, match="confound"):
        generate(4, confound=1.5)
    with pytest.raises(ValueError, match="n_samples"):
        generate(0)


def test_missing_optional_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install captum-gradmask\[datasets\]"):
        import_optional("sklearn.datasets")


def _auc_of_trained_logistic(train, test):
    model = LogisticRegression(max_iter=2000).fit(train.images.flatten(1), train.labels)
    return roc_auc_score(test.labels, model.predict_proba(test.images.flatten(1))[:, 1])


# --- Decoy Digits --------------------------------------------------------------------


def test_decoy_digits_swatch_encodes_label_in_train_only():
    train = decoy_digits(None, "train", classes=BINARY_CLASSES)
    test = decoy_digits(None, "test", classes=BINARY_CLASSES)
    assert torch.equal(train.decoy_labels, train.labels)
    agreement = (test.decoy_labels == test.labels).float().mean()
    assert 0.4 < agreement < 0.6  # random shade of two
    ten_class = decoy_digits(None, "test")
    assert (ten_class.decoy_labels == ten_class.labels).float().mean() < 0.2


def test_decoy_digits_splits_are_disjoint_pools():
    sizes = [len(decoy_digits(None, split).labels) for split in ("train", "valid", "test")]
    assert sizes == [1078, 359, 360]  # the 1,797 bundled digits, 60 / 20 / 20
    with pytest.raises(ValueError, match="exceeds"):
        decoy_digits(400, "test")


def test_decoy_digits_mask_is_everything_but_the_corner_swatch():
    data = decoy_digits(200, "train", classes=(3, 8), seed=1)
    swatch = data.masks == 0
    assert (swatch.sum(dim=(1, 2, 3)) == 4).all()  # 2x2 at 16x16
    corners = swatch[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.sum(dim=(1, 2)) == 1).all()  # in exactly one corner
    shades = swatch_shades(2).float()[data.decoy_labels]
    swatch_values = data.images[swatch].view(-1, 4)
    assert torch.allclose(swatch_values, shades[:, None].expand(-1, 4))
    assert data.images.min() >= 0 and data.images.max() <= 1


def test_decoy_digits_swatch_size_option():
    data = decoy_digits(50, "train", classes=DECOY_PAIR, swatch_size=DECOY_SWATCH, seed=2)
    swatch = data.masks == 0
    assert (swatch.sum(dim=(1, 2, 3)) == DECOY_SWATCH**2).all()
    corners = swatch[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.sum(dim=(1, 2)) == 1).all()
    default = decoy_digits(50, "train", classes=DECOY_PAIR, seed=2)
    assert torch.equal(default.labels, data.labels)  # same digits, only the swatch grows
    assert torch.equal(default.decoy_labels, data.decoy_labels)
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match="swatch_size"):
            decoy_digits(4, swatch_size=bad)


def test_decoy_digits_pair_learnable_without_the_decoy():
    clean = decoy_digits(None, "train", classes=DECOY_PAIR, swatch_size=DECOY_SWATCH, confound=0.0)
    test = decoy_digits(None, "test", classes=DECOY_PAIR, swatch_size=DECOY_SWATCH)
    assert _auc_of_trained_logistic(clean, test) > 0.9


def test_decoy_digits_learnable_without_the_decoy():
    clean = decoy_digits(None, "train", classes=BINARY_CLASSES, confound=0.0)
    test = decoy_digits(None, "test", classes=BINARY_CLASSES)
    assert _auc_of_trained_logistic(clean, test) > 0.85  # measured 0.94


# --- crosses --------------------------------------------------------------------------


def test_crosses_bar_side_tied_in_train_and_swapped_at_test():
    train, test = crosses(200, "train"), crosses(200, "test")
    assert torch.equal(train.bar_on_right, train.labels == 1)
    assert torch.equal(test.bar_on_right, test.labels == 0)
    independent = crosses(400, "train", confound=0.5)
    assert 0.4 < (independent.bar_on_right == (independent.labels == 1)).float().mean() < 0.6


def test_crosses_masks_are_exactly_the_crosses():
    data = crosses(100, "train", seed=2)
    assert (data.images[data.masks == 1] == 1).all()
    bar_pixels = (data.images * (1 - data.masks)).sum(dim=(1, 2, 3))
    assert (bar_pixels == 6).all()  # the 2x3 bar is all that is outside the mask
    cross_pixels = data.masks.sum(dim=(1, 2, 3))  # 4 r + 1 per cross, r in {3, 4}
    assert set(cross_pixels[data.labels == 0].tolist()) <= {13.0, 17.0}
    assert set(cross_pixels[data.labels == 1].tolist()) <= {26.0, 34.0}


def test_crosses_learnable_without_the_bar_signal():
    clean = crosses(500, "train", confound=0.5, seed=0)
    test = crosses(300, "test", seed=0)
    assert _auc_of_trained_logistic(clean, test) > 0.9  # measured 1.00


# --- brain slices ---------------------------------------------------------------------


def test_brain_slices_artifact_correlated_in_train_independent_at_test():
    train = brain_slices(1000, "train")
    test = brain_slices(1000, "test")
    train_agreement = (train.has_artifact == (train.labels == 1)).float().mean()
    test_agreement = (test.has_artifact == (test.labels == 1)).float().mean()
    assert 0.86 < train_agreement < 0.94  # confound 0.9
    assert 0.45 < test_agreement < 0.55


@pytest.mark.parametrize("artifact", ["bias_field", "zipper"])
def test_brain_slices_artifact_changes_only_flagged_images(artifact):
    with_artifact = brain_slices(16, "test", artifact=artifact, confound=1.0, noise_std=0.0, seed=5)
    assert torch.equal(with_artifact.has_artifact, with_artifact.labels == 1)
    anatomy = with_artifact.images[with_artifact.labels == 0]
    flagged = with_artifact.images[with_artifact.labels == 1]
    if artifact == "bias_field":
        right_minus_left = flagged[..., 32:].mean() - flagged[..., :32].mean()
        assert right_minus_left - (anatomy[..., 32:].mean() - anatomy[..., :32].mean()) > 0.02
    else:
        column = round(0.8 * 63)
        assert flagged[..., column].abs().amax() >= 0.3
        assert anatomy[..., column].abs().amin() == 0  # background stays 0 without it


def test_brain_slices_lesion_masks_lie_in_tissue():
    data = brain_slices(200, "train", artifact="zipper", confound=0.5, noise_std=0.0, seed=1)
    area = data.masks.sum(dim=(1, 2, 3))
    assert (area[data.labels == 0] == 0).all()
    lesion_area = area[data.labels == 1]
    assert lesion_area.min() >= 9 and lesion_area.max() <= 52  # discs of radius 2 to 4
    assert (data.masks[..., [0, -1], :] == 0).all() and (data.masks[..., [0, -1]] == 0).all()
    lesion_pixels = data.images[data.masks == 1]
    assert (lesion_pixels > 0.3).all()  # brain tissue plus the lesion, not background


def test_brain_slices_learnable_without_the_artifact():
    torch.manual_seed(0)
    clean = brain_slices(128, "train", confound=0.5, size=48, seed=0)  # 48 px: a quick test
    test = brain_slices(256, "test", size=48, seed=0)
    model = nn.Sequential(  # a lesion detector: local filters, then the strongest response
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(clean.images), clean.labels).backward()
        optimizer.step()
    with torch.no_grad():
        scores = model(test.images).softmax(dim=1)[:, 1]
    assert roc_auc_score(test.labels, scores) > 0.7  # measured 0.88
