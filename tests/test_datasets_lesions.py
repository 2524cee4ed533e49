import pathlib
import subprocess
import sys

import pytest
import torch

from captum_gradmask.datasets.lesions import ARTIFACTS, add_artifact, confounded_lesions

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("artifact", ARTIFACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_device(device, artifact, dtype):
    data = confounded_lesions(6, artifact=artifact, size=24, seed=0, device=device, dtype=dtype)
    assert data.images.shape == data.masks.shape == (6, 1, 24, 24)
    assert data.labels.shape == data.has_artifact.shape == (6,)
    assert data.images.dtype == data.masks.dtype == dtype
    assert data.labels.dtype == torch.long and data.has_artifact.dtype == torch.bool
    for tensor in data:
        assert tensor.device.type == torch.device(device).type
    assert data.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert set(data.masks.unique().tolist()) <= {0.0, 1.0}


def test_same_seed_same_images_on_every_device(device):
    on_cpu = confounded_lesions(8, seed=3)
    again = confounded_lesions(8, seed=3, device=device)
    for expected, actual in zip(on_cpu, again):
        torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0)
    other_seed = confounded_lesions(8, seed=4)
    assert not torch.equal(other_seed.images, on_cpu.images)


def test_global_random_state_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    confounded_lesions(4, artifact="marker", seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_artifact_goes_with_label_in_training_not_at_test(artifact):
    def artifact_rate(data, label):
        return data.has_artifact[data.labels == label].double().mean().item()

    train = confounded_lesions(4000, artifact=artifact, confound=0.9, size=16, lesion_radius=2.0)
    test = confounded_lesions(4000, artifact=artifact, confound=0.5, size=16, lesion_radius=2.0)
    assert artifact_rate(train, 1) == pytest.approx(0.9, abs=0.03)
    assert artifact_rate(train, 0) == pytest.approx(0.1, abs=0.03)
    assert artifact_rate(test, 1) == pytest.approx(0.5, abs=0.04)
    assert artifact_rate(test, 0) == pytest.approx(0.5, abs=0.04)
    perfect = confounded_lesions(200, artifact=artifact, confound=1.0)
    assert torch.equal(perfect.has_artifact, perfect.labels == 1)


@pytest.mark.parametrize("artifact", ARTIFACTS)
def test_artifact_is_drawn_where_present(artifact):
    data = confounded_lesions(40, artifact=artifact, confound=0.5, noise_std=0.0, seed=2)
    corner_brightness = data.images[:, 0, :6, :6].mean(dim=(1, 2))
    assert torch.all((corner_brightness > 0.2) == data.has_artifact)


def test_masks_cover_the_lesion():
    data = confounded_lesions(50, lesion_radius=3.0, noise_std=0.0, seed=5)
    lesion_images = data.labels == 1
    areas = data.masks.sum(dim=(1, 2, 3))
    assert torch.all(areas[~lesion_images] == 0)
    assert torch.all((areas[lesion_images] > 20) & (areas[lesion_images] < 36))  # pi r^2 = 28
    # Without noise or artifact, the lesion intensity peaks inside the mask.
    clean = confounded_lesions(50, confound=0.0, lesion_radius=3.0, noise_std=0.0, seed=5)
    images, masks = clean.images[lesion_images], clean.masks[lesion_images]
    brightest = images.flatten(1).argmax(dim=1)
    assert torch.all(masks.flatten(1)[torch.arange(len(masks)), brightest] == 1)
    # The mask is where the bump exceeds a third of its peak: 2/3 of the lesion's
    # intensity; a 2-pixel dilation (the example's) covers over 90%.
    inside = (images * masks).abs().sum() / images.abs().sum()
    dilated = torch.nn.functional.max_pool2d(masks, kernel_size=5, stride=1, padding=2)
    inside_dilated = (images * dilated).abs().sum() / images.abs().sum()
    assert 0.6 < inside < 0.75 and inside_dilated > 0.9


def test_artifacts_stay_outside_the_lesion_masks():
    data = confounded_lesions(200, confound=0.5, seed=6)
    for artifact in ARTIFACTS:
        marked = add_artifact(torch.zeros(1, 1, 32, 32), torch.tensor([True]), artifact)
        artifact_zone = marked.abs() > 0.1  # 10% of the spot peak
        assert not (artifact_zone & (data.masks > 0)).any()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="artifact"):
        confounded_lesions(4, artifact="ruler")
    with pytest.raises(ValueError, match="confound"):
        confounded_lesions(4, confound=1.5)
    with pytest.raises(ValueError, match="n_images"):
        confounded_lesions(0)


@pytest.mark.slow
def test_main_example_quick_run(tmp_path):
    figure = tmp_path / "train_gradmask.png"
    completed = subprocess.run(
        [sys.executable, "examples/train_gradmask.py", "--quick", "--device", "cpu",
         "--out", str(figure)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "test AUC (artifact independent of the label at test)" in completed.stdout
    from examples.train_gradmask import SETTINGS

    table_rows = [line for line in completed.stdout.splitlines() if line.startswith(ARTIFACTS)]
    assert len(table_rows) == len(SETTINGS) * len(ARTIFACTS)
    for artifact in ARTIFACTS:
        for setting in SETTINGS:
            assert any(row.startswith(f"{artifact:8s}  {setting.name}") for row in table_rows)
    assert figure.exists()
