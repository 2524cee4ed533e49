"""Synthetic crosses: count the crosses, ignore the distractor (Viviano et al. 2021).

The synthetic task of Viviano, Simpson, Dutil, Bengio & Cohen (ICLR 2021),
"Saliency is a possible red herring when diagnosing poor generalization": binary
images with one cross (label 0) or two crosses (label 1), plus a distractor, a
small bar near the bottom edge. In training the bar sits on the left in one-cross
images and on the right in two-cross images; at test the sides are swapped. A
model that reads the bar is perfect in training and perfectly wrong at test (the
paper's baseline test AUC is 0.00).

Construction, after the authors' generator: 28x28 images; each cross has two
arms of ``2 r + 1`` pixels with ``r`` 3 or 4 (drawn per image); the bar is 2x3
pixels, 5 pixels from the bottom and from the left or right edge; all drawn at
intensity 1 on 0. The authors flip the whole test image to move the bar; here the
bar is drawn on the other side directly, which gives the same images up to a
mirror of the crosses. Unlike the authors' images, crosses never touch each other
or the bar (rejection sampling with a one-pixel gap), so the mask is exactly the
crosses and the count is never ambiguous. The authors also flip the bar in their
validation set; so does ``split="valid"`` by default.

Measured: a small CNN or a logistic regression trained on 64, 128 or 500 training
images scores test AUC 0.00 to 0.005, as the paper's baseline; trained with the bar
independent of the label (``confound=0.5``) the CNN scores 0.89 to 0.92 at 64
images and 1.00 from 128.

Random numbers are drawn on the CPU from a private generator, so a seed gives the
same images on every device and the global random state is not touched.
"""

from typing import List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from ._common import bernoulli, check_count, resolve_confound, split_generator

ARM_HALF_LENGTHS = (3, 4)  #: r: each arm of a cross is 2 r + 1 pixels long
BAR_SHAPE = (2, 3)  #: rows, columns of the distractor bar
BAR_MARGIN = 5  #: pixels between the bar and the bottom / side edge

Box = Tuple[int, int, int, int]  # top, left, bottom, right (inclusive)


class CrossImages(NamedTuple):
    images: Tensor  #: (N, 1, size, size) float: crosses and bar at 1, background 0
    labels: Tensor  #: (N,) long: 1 for two crosses (odd indices), 0 for one
    masks: Tensor  #: (N, 1, size, size) float: 1 on the crosses' pixels
    bar_on_right: Tensor  #: (N,) bool: the distractor bar is on the right


def crosses(
    n_samples: int,
    split: str = "train",
    confound: Optional[float] = None,
    size: int = 28,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CrossImages:
    r"""Generate one-cross vs two-cross images with a label-linked distractor bar.

    Odd-indexed images have two crosses (label 1), even-indexed ones one cross.
    The bar is on the label's training side (left for label 0, right for label 1)
    with probability ``confound``, otherwise on the other side.

    Args:
        n_samples (int): number of images N.
        split (str): "train", "valid" or "test"; sets the default of ``confound``
            and gives each split its own random stream. Default: "train"
        confound (float, optional): probability that the bar is on the label's
            training side. Default: 1.0 for "train", 0.0 for "valid" and "test"
            (sides swapped, as the paper); 0.5 makes the bar independent of the
            label.
        size (int): side of the square images in pixels (>= 24). Default: 28
        seed (int): seed of the private generator. Default: 0
        device (str or torch.device): where the tensors are returned. Default: "cpu"
        dtype (torch.dtype): floating-point dtype of ``images`` and ``masks``.
            Default: float32

    Returns:
        CrossImages: images, labels, cross masks (GradMask's ``mask``) and the
        side of each bar.

    Examples::

        >>> train = crosses(64, "train", seed=0)
        >>> test = crosses(64, "test", seed=0)
        >>> bool((train.bar_on_right == (train.labels == 1)).all())
        True
        >>> bool((test.bar_on_right == (test.labels == 0)).all())
        True
    """
    check_count("n_samples", n_samples)
    check_count("size", size, minimum=24)
    confound = resolve_confound(confound, split, train=1.0, held_out=0.0)
    generator = split_generator(seed, split)
    labels = torch.arange(n_samples) % 2
    on_training_side = bernoulli(torch.full((n_samples,), confound, dtype=torch.float64), generator)
    bar_on_right = on_training_side == (labels == 1)
    images = torch.zeros(n_samples, 1, size, size, dtype=torch.float64)
    masks = torch.zeros_like(images)
    for index in range(n_samples):
        bar = _bar_box(size, bool(bar_on_right[index]))
        _fill(images[index, 0], bar)
        for cross in _place_crosses(int(labels[index]) + 1, size, bar, generator):
            for arm in cross:
                _fill(images[index, 0], arm)
                _fill(masks[index, 0], arm)
    return CrossImages(
        images=images.to(device=device, dtype=dtype),
        labels=labels.to(device),
        masks=masks.to(device=device, dtype=dtype),
        bar_on_right=bar_on_right.to(device),
    )


def _bar_box(size: int, on_right: bool) -> Box:
    bottom = size - BAR_MARGIN - 1
    top = bottom - BAR_SHAPE[0] + 1
    left = size - BAR_MARGIN - BAR_SHAPE[1] if on_right else BAR_MARGIN
    return top, left, bottom, left + BAR_SHAPE[1] - 1


def _place_crosses(
    n_crosses: int, size: int, bar: Box, generator: torch.Generator
) -> List[List[Box]]:
    """Crosses as lists of two arm boxes, apart from each other and from the bar.

    All crosses of an image share one arm half-length r; each centre is drawn
    uniformly where the cross fits in the image, again until its bounding box
    keeps a one-pixel gap to the bar and to the crosses already placed.
    """
    choice = torch.randint(len(ARM_HALF_LENGTHS), (1,), generator=generator)
    r = ARM_HALF_LENGTHS[int(choice)]
    occupied = [bar]
    crosses_placed = []
    while len(crosses_placed) < n_crosses:
        row, column = torch.randint(r, size - r, (2,), generator=generator).tolist()
        bounding_box = (row - r, column - r, row + r, column + r)
        if any(_near(bounding_box, box) for box in occupied):
            continue
        occupied.append(bounding_box)
        vertical_arm = (row - r, column, row + r, column)
        horizontal_arm = (row, column - r, row, column + r)
        crosses_placed.append([vertical_arm, horizontal_arm])
    return crosses_placed


def _near(first: Box, second: Box) -> bool:
    """Whether two boxes overlap or touch (less than one pixel of gap)."""
    return not (
        first[2] + 1 < second[0]
        or second[2] + 1 < first[0]
        or first[3] + 1 < second[1]
        or second[3] + 1 < first[1]
    )


def _fill(image: Tensor, box: Box) -> None:
    top, left, bottom, right = box
    image[top : bottom + 1, left : right + 1] = 1.0
