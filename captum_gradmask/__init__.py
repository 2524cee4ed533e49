"""captum-gradmask: make medical-imaging classifiers look at the right place.

A Captum plugin: saliency-based training penalties (GradMask), contrast saliency,
differentiable Captum attributions, mask refinement, iterative unveiling and
MC-dropout uncertainty. Localisation metrics live in ``captum_gradmask.metrics``,
offline data generators in ``captum_gradmask.datasets``, figures in
``captum_gradmask.viz``.
"""

from captum_gradmask.contrast_saliency import ContrastSaliency
from captum_gradmask.differentiable import differentiable
from captum_gradmask.gradmask import GradMask, GradMaskOptions, GradMaskOutput, gradmask_penalty
from captum_gradmask.mc_attribution import MCAttribution
from captum_gradmask.mc_dropout import MCDropout
from captum_gradmask.refine import refine_mask
from captum_gradmask.sliding_window import mc_sliding_window_inference
from captum_gradmask.uncertainty import Uncertainty, predictive_uncertainty
from captum_gradmask.unveiling import IterativeUnveiling, UnveilingResult
from captum_gradmask._validation import value_checks

__version__ = "0.1.0.dev0"

__all__ = [
    "ContrastSaliency",
    "GradMask",
    "GradMaskOptions",
    "GradMaskOutput",
    "IterativeUnveiling",
    "MCAttribution",
    "MCDropout",
    "Uncertainty",
    "UnveilingResult",
    "differentiable",
    "gradmask_penalty",
    "mc_sliding_window_inference",
    "predictive_uncertainty",
    "refine_mask",
    "value_checks",
    "__version__",
]
