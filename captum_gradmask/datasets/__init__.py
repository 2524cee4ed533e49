"""Offline data generators: every data set is built from a seed, on any device.

Those that read bundled data import it only when called: ``decoy_digits`` needs
scikit-learn, ``brain_slices`` nilearn (the ``datasets`` extra).

Examples::

    >>> from captum_gradmask.datasets import confounded_lesions
    >>> train = confounded_lesions(512, artifact="marker", confound=1.0, seed=0)
    >>> train.images.shape, train.masks.shape
    (torch.Size([512, 1, 32, 32]), torch.Size([512, 1, 32, 32]))
"""

from captum_gradmask.datasets.brain_slices import brain_slices
from captum_gradmask.datasets.crosses import crosses
from captum_gradmask.datasets.decoy_digits import decoy_digits
from captum_gradmask.datasets.lesions import confounded_lesions
from captum_gradmask.datasets.regions import multi_region_images
from captum_gradmask.datasets.vessels import synthetic_vessels

__all__ = [
    "brain_slices",
    "confounded_lesions",
    "crosses",
    "decoy_digits",
    "multi_region_images",
    "synthetic_vessels",
]
