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
    rewritten = tmp_path / "rewritten"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--from-results", str(tmp_path / "results.json"), "--out-dir", str(rewritten)],
        check=True, capture_output=True, timeout=120,
    )
    assert (rewritten / "results.md").read_text() == report


def test_fewer_masks_keep_a_share_of_the_masked_images_drawn_per_seed():
    from examples.reproduce_table import Split, with_fewer_masks

    has_mask = torch.arange(40) % 4 != 0  # 30 images with a mask
    data = Split(torch.zeros(40, 1, 2, 2), torch.zeros(40), torch.zeros(40, 1, 2, 2), has_mask)
    assert with_fewer_masks(data, 1.0, seed=0) is data
    fewer = with_fewer_masks(data, 0.1, seed=0).has_mask
    assert fewer.sum() == 3 and not (fewer & ~has_mask).any()
    assert torch.equal(with_fewer_masks(data, 0.1, seed=0).has_mask, fewer)
    assert not torch.equal(with_fewer_masks(data, 0.1, seed=1).has_mask, fewer)


def test_runs_merge_into_one_report_with_the_mask_share_table(tmp_path):
    from examples.reproduce_table import (
        DATASETS, METHODS, RECOMMENDED, Result, load_runs, mask_share_table, save_run,
    )

    crosses = next(d for d in DATASETS if d.name == "crosses")

    def results(method, share, auc):
        return [Result("crosses", 64, seed, method, 1e-3, 1.0, 0.5, auc + 0.01 * seed, 0.5, share)
                for seed in range(3)]

    main = results("baseline", 1.0, 0.1) + results(RECOMMENDED, 1.0, 0.9)
    sweep = results(RECOMMENDED, 0.5, 0.7) + results(RECOMMENDED, 0.1, 0.3)
    save_run(tmp_path / "main.json", main, [crosses], (64,), METHODS, (), "main", 1.0)
    save_run(tmp_path / "sweep.json", sweep, [crosses], (64,), METHODS, (0.5, 0.1), "sweep", 2.0)
    run = load_runs([tmp_path / "main.json", tmp_path / "sweep.json"])
    assert len(run["results"]) == 12 and run["shares"] == (0.5, 0.1) and run["elapsed"] == 3.0
    table = mask_share_table(run["results"], run["datasets"], run["sizes"], run["shares"])
    assert "| crosses | none (baseline) | 0.11 ± 0.01 |" in table
    assert "| crosses | 100% | 0.91 ± 0.01 |" in table
    assert "| crosses | 10% | 0.31 ± 0.01 |" in table


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


def test_merged_runs_describe_each_distinct_protocol_once():
    from examples.reproduce_table import merged_protocol

    assert merged_protocol(["20 seeds"]) == "20 seeds"
    assert merged_protocol(["20 seeds, [64]", "20 seeds, [64]", "20 seeds, [128]"]) == (
        "3 runs merged: 20 seeds, [64]; 20 seeds, [128]"
    )


def test_layer_saliencies_read_a_relu_at_half_the_input_side():
    from examples.reproduce_table import DATASETS

    for dataset in DATASETS:
        model = dataset.model()
        images = dataset.load(2, "train", 0, "cpu").images
        outputs = []
        model[dataset.layer].register_forward_hook(lambda module, args, output: outputs.append(output))
        model(images)
        assert isinstance(model[dataset.layer], torch.nn.ReLU)
        assert outputs[0].shape[-1] == images.shape[-1] // 2
