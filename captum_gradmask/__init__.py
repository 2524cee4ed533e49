"""captum-gradmask: make medical-imaging classifiers look at the right place.

A Captum plugin: saliency-based training penalties (GradMask), contrast saliency,
differentiable Captum attributions, mask refinement, iterative unveiling and
MC-dropout uncertainty.
"""

from captum_gradmask.contrast_saliency import ContrastSaliency
from captum_gradmask.differentiable import differentiable

__version__ = "0.1.0.dev0"

__all__ = ["ContrastSaliency", "differentiable", "__version__"]
