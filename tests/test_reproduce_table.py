"""The Table 1 reproduction script runs end to end in its quick mode."""

import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "reproduce_table.py"


@pytest.mark.slow
def test_quick_run_writes_the_report_and_figure(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    report = (tmp_path / "results.md").read_text()
    assert "| Decoy Digits (binary) | baseline |" in report
    assert "GradMask contrast sq_l2" in report
    assert (tmp_path / "results.png").stat().st_size > 0


def test_crosses_cnn_has_exactly_zero_saliency_on_blank_background(device):
    """The crosses CNN's first convolution has no bias, so pixels more than two
    pixels (its 3x3 receptive field plus the pooled 3x3 one) from any drawn pixel
    get an input gradient of exactly zero, at initialisation as after training."""
    from captum_gradmask.datasets.crosses import crosses
    from examples.reproduce_table import crosses_cnn

    torch.manual_seed(0)
    model = crosses_cnn().to(device)
    images = crosses(8, seed=3, device=device).images.requires_grad_()
    logits = model(images)
    (saliency,) = torch.autograd.grad((logits[:, 0] - logits[:, 1]).sum(), images)
    near_drawn = torch.nn.functional.max_pool2d((images > 0).double(), 5, stride=1, padding=2) > 0
    assert saliency[~near_drawn].abs().max().item() == 0.0
    assert saliency[near_drawn].abs().max().item() > 0.0
