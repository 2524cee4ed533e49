"""help() on every public class shows its own arguments and an example, not the text
its __init__ would inherit from Captum or torch."""

import pydoc

import pytest

import captum_gradmask

CLASSES = ["ContrastSaliency", "GradMask", "IterativeUnveiling", "MCAttribution", "MCDropout"]
FUNCTIONS = ["differentiable", "gradmask_penalty", "mc_sliding_window_inference", "predictive_uncertainty", "refine_mask"]


@pytest.mark.parametrize("name", CLASSES + FUNCTIONS)
def test_help_shows_own_arguments_and_an_example(name):
    text = pydoc.render_doc(getattr(captum_gradmask, name), renderer=pydoc.plaintext)
    assert "Args:" in text and "Examples::" in text
    assert "forward_func (Callable or torch.nn.Module): This can either be" not in text
    assert "Initialize internal Module state" not in text
