import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from captum_gradmask.metrics import (
    mask_dice,
    mask_iou,
    pointing_game,
    region_recall,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    roc_auc,
)


def random_case(seed, shape=(5, 1, 9, 7), device="cpu", dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    attributions = torch.randn(shape, generator=generator, dtype=dtype)
    masks = torch.rand(shape, generator=generator) < 0.3
    masks[0] = False  # one empty ground truth
    return attributions.to(device), masks.to(device)


def hand_written(attributions, masks):
    """Per-sample loops over Python lists: pointing game, mass and rank accuracy."""
    results = {"pointing": [], "mass": [], "rank": []}
    for a, m in zip(attributions.double().tolist(), masks.tolist()):
        a, m = np.ravel(a).tolist(), np.ravel(m).tolist()
        inside = [i for i, flag in enumerate(m) if flag]
        if not inside:
            for values in results.values():
                values.append(math.nan)
            continue
        peak = max(a)
        results["pointing"].append(float(any(a[i] == peak for i in inside)))
        results["mass"].append(sum(a[i] for i in inside) / sum(a))
        top = sorted(range(len(a)), key=lambda i: -a[i])[: len(inside)]
        results["rank"].append(sum(m[i] for i in top) / len(inside))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in results.items()}


@given(seed=st.integers(0, 2**31))
def test_against_hand_written_formulas(seed):
    attributions, masks = random_case(seed)
    expected = hand_written(attributions, masks)
    torch.testing.assert_close(pointing_game(attributions, masks), expected["pointing"], equal_nan=True)
    torch.testing.assert_close(relevance_mass_accuracy(attributions, masks), expected["mass"], equal_nan=True)
    torch.testing.assert_close(relevance_rank_accuracy(attributions, masks), expected["rank"], equal_nan=True)


def test_against_quantus():
    quantus = pytest.importorskip("quantus")
    attributions, masks = random_case(7, shape=(6, 1, 12, 10), dtype=torch.float32)
    with_ties = attributions.clone()
    with_ties[3] = with_ties[3].clamp(max=0.5)  # several maxima; rank ties are broken
    # differently by each sort, so the rank accuracy is compared without ties
    for ours, theirs, a_batch in [
        (pointing_game, quantus.PointingGame, with_ties),
        (relevance_mass_accuracy, quantus.RelevanceMassAccuracy, attributions),
        (relevance_rank_accuracy, quantus.RelevanceRankAccuracy, attributions),
    ]:
        reference = theirs(disable_warnings=True)(
            model=None, x_batch=np.zeros(a_batch.shape, dtype=np.float32),
            y_batch=np.zeros(6, dtype=int), a_batch=a_batch.numpy(),
            s_batch=masks.numpy().astype(np.float32),
        )
        scores = ours(a_batch, masks).double().numpy()
        # Sample 0 has an empty mask: NaN here; Quantus' PointingGame writes NaN into
        # a bool array, which turns it into True.
        assert np.isnan(scores[0])
        np.testing.assert_allclose(scores[1:], np.asarray(reference, dtype=np.float64)[1:],
                                   rtol=1e-5, err_msg=ours.__name__)


def test_pointing_game_ties_dtype_and_device(device):
    attributions = torch.zeros(2, 1, 4, 4, device=device, dtype=torch.float32)
    attributions[:, 0, 0, 0] = attributions[:, 0, 3, 3] = 1.0  # two maxima
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool, device=device)
    masks[0, 0, 3, 3] = True  # one maximum inside
    masks[1, 0, 1, 1] = True
    scores = pointing_game(attributions, masks)
    assert scores.dtype == torch.float32 and scores.device.type == torch.device(device).type
    assert scores.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("n_spatial", [2, 3])
def test_pointing_game_tolerance_is_euclidean(device, n_spatial):
    shape = (1, 1) + (16,) * n_spatial
    attributions = torch.zeros(shape, device=device)
    masks = torch.zeros(shape, dtype=torch.bool, device=device)
    masks[(0, 0) + (2,) * n_spatial] = True
    attributions[(0, 0, 5, 6) + (2,) * (n_spatial - 2)] = 1.0  # 5 pixels away
    assert pointing_game(attributions, masks).item() == 0.0
    assert pointing_game(attributions, masks, tolerance=4.9).item() == 0.0
    assert pointing_game(attributions, masks, tolerance=5).item() == 1.0


def test_rank_accuracy_counts_the_mask_size():
    attributions = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0]]])
    masks = torch.tensor([[[True, False, True, True, False]]])
    # top 3 pixels are 0, 1, 2; two of them in the mask
    assert relevance_rank_accuracy(attributions, masks).item() == pytest.approx(2 / 3)


def test_iou_and_dice(device):
    masks = torch.zeros(3, 1, 4, 4, dtype=torch.bool, device=device)
    targets = torch.zeros_like(masks)
    masks[0, 0, :2] = True  # 8 pixels
    targets[0, 0, 1:3] = True  # 8 pixels, 4 shared
    masks[1, 0, 0, 0] = True  # no overlap; sample 2: both empty
    iou, dice = mask_iou(masks, targets), mask_dice(masks, targets)
    assert iou.device.type == torch.device(device).type
    torch.testing.assert_close(iou.cpu(), torch.tensor([4 / 12, 0.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(dice.cpu(), torch.tensor([8 / 16, 0.0, math.nan]), equal_nan=True)
    torch.testing.assert_close(mask_iou(masks.float(), targets.long()), iou, equal_nan=True)


def test_region_recall_per_iteration(device):
    side = 10
    regions = torch.zeros(3, 3, 1, side, side, dtype=torch.bool)
    regions[:, 0, 0, 0:2, 0:2] = True  # 4 pixels
    regions[:, 1, 0, 5:7, 5:7] = True
    regions[:, 2, 0, 8:10, 0:5] = True  # 10 pixels
    regions[1, 2] = False  # sample 1 has two regions
    regions[2] = False  # sample 2 has none
    masks = torch.zeros(3, 3, 1, side, side, dtype=torch.bool)
    masks[:, 0, 0, 0:2, 0:2] = True  # region 0, whole
    masks[:, 1, 0, 5, 5:7] = True  # region 1, exactly half
    masks[:, 2, 0, 8, 0:4] = True  # region 2, 40%
    recall = region_recall(masks.to(device), regions.to(device))
    expected = torch.tensor([[1 / 3, 2 / 3, 2 / 3], [1 / 2, 1.0, 1.0], [math.nan] * 3])
    torch.testing.assert_close(recall.cpu(), expected, equal_nan=True)
    strict = region_recall(masks.to(device), regions.to(device), min_coverage=0.6)
    torch.testing.assert_close(strict.cpu()[0], torch.tensor([1 / 3, 1 / 3, 1 / 3]))


@pytest.mark.parametrize(
    "function, arguments, error, message",
    [
        (pointing_game, (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4)), TypeError,
         "attributions must be a floating-point Tensor, got torch.int64"),
        (pointing_game, (torch.ones(2, 1, 4, 4), torch.ones(2, 3, 4, 4)), ValueError,
         r"masks must have the shape of attributions \(2, 1, 4, 4\), got \(2, 3, 4, 4\)"),
        (pointing_game, (torch.ones(4), torch.ones(4)), ValueError, "at least 2 dims"),
        (pointing_game, (torch.ones(2, 4), [1, 0]), TypeError, "masks must be a Tensor, got list"),
        (pointing_game, (torch.ones(2, 4), torch.ones(2, 4), -1.0), ValueError, "tolerance must be >= 0"),
        (pointing_game, (torch.ones(2, 4), torch.ones(2, 4), "2"), TypeError, "tolerance must be a number"),
        (pointing_game, (torch.ones(2, 4), torch.ones(2, 4), 2.0), ValueError, "needs attributions shaped"),
        (relevance_mass_accuracy, (torch.ones(0, 4), torch.ones(0, 4)), ValueError, "non-empty batch"),
        (relevance_rank_accuracy, ("a", torch.ones(2, 4)), TypeError, "attributions must be a floating-point"),
        (mask_iou, (torch.ones(2, 4), torch.ones(2, 5)), ValueError, "targets must have the shape of masks"),
        (mask_dice, (torch.ones(2, 4), None), TypeError, "targets must be a Tensor, got NoneType"),
        (region_recall, (torch.ones(2, 3, 1, 4, 4, dtype=torch.bool), torch.ones(2, 3, 4, 4, dtype=torch.bool)),
         ValueError, r"regions must be shaped \(N, K, 1, \*spatial\)"),
        (region_recall, (torch.ones(2, 3, 1, 4, 4, dtype=torch.bool), torch.ones(3, 3, 1, 4, 4, dtype=torch.bool)),
         ValueError, r"regions \(3, 3, 1, 4, 4\) must match masks \(2, 3, 1, 4, 4\) in batch size"),
        (region_recall, (torch.ones(2, 3, 1, 4, 4, dtype=torch.bool), torch.ones(2, 3, 1, 4, 4, dtype=torch.bool), 0.0),
         ValueError, r"min_coverage must be in \(0, 1\]"),
        (region_recall, (torch.ones(2, 3, 1, 4, 4, dtype=torch.bool), torch.ones(2, 3, 1, 4, 4, dtype=torch.bool), None),
         TypeError, "min_coverage must be a float"),
    ],
)
def test_errors(function, arguments, error, message):
    with pytest.raises(error, match=message):
        function(*arguments)


def test_roc_auc_matches_the_pairwise_definition_with_ties():
    scores = torch.tensor([0.2, 0.8, 0.5, 0.5, 0.1])
    labels = torch.tensor([0, 1, 1, 0, 0])
    # positives 0.8, 0.5 against negatives 0.2, 0.5, 0.1: 5 wins, one tie, out of 6
    assert roc_auc(scores, labels) == pytest.approx(5.5 / 6)
    assert roc_auc(-scores, labels) == pytest.approx(0.5 / 6)


def test_roc_auc_rejects_a_single_class():
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
