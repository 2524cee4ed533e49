"""Two gloo processes on loopback give the single-process results: GradMask under
DistributedDataParallel (parameter gradients of training on the whole batch), and
MC-dropout uncertainty and unveiling over a data set split with DistributedSampler."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from captum.attr import Saliency
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from captum_gradmask import GradMask, IterativeUnveiling, MCDropout
from helpers import small_cnn

WORLD_SIZE = 2
BATCH_SIZE = 8
SIDE = 6
# Class-1 examples have a lesion mask. Each half of the batch (one rank's share) holds
# two of them: with reduction="mean" each rank averages cross-entropy over its 4
# examples and the penalty over its 2 masked ones, and DDP averages the gradients of
# the ranks, which equals the mean over the whole batch only because every rank has
# the same number of examples and of masked examples.
LABELS = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])
TOLERANCE = {"exact": 1e-9, "forward_mode": 1e-9, "finite_difference": 1e-4}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_gradmask_ddp.py"


def _batch(device):
    """Inputs, lesion masks and labels, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(BATCH_SIZE, 1, SIDE, SIDE, generator=generator, dtype=torch.float64)
    masks = torch.zeros(BATCH_SIZE, 1, SIDE, SIDE, dtype=torch.float64)
    masks[:, :, 2:4, 2:4] = 1.0
    return inputs.to(device), masks.to(device), LABELS.to(device)


def _model(device):
    torch.manual_seed(0)
    return small_cnn(side=SIDE).double().to(device)


def _gradients(model, wrapped, inputs, masks, labels, method):
    """One training step's parameter gradients: cross-entropy + GradMask penalty."""
    model.zero_grad()
    outputs, penalty = GradMask(wrapped, method=method)(inputs, masks, has_mask=labels == 1)
    (F.cross_entropy(outputs, labels) + penalty).backward()
    return [parameter.grad.clone() for parameter in model.parameters()]


def _ddp_gradients(rank, device):
    """One DDP rank's gradients of both methods, on its half of the batch."""
    model = _model(device)
    ddp_model = DistributedDataParallel(model)
    share = slice(rank * BATCH_SIZE // WORLD_SIZE, (rank + 1) * BATCH_SIZE // WORLD_SIZE)
    inputs, masks, labels = (tensor[share] for tensor in _batch(device))
    return {
        method: _gradients(model, ddp_model, inputs, masks, labels, method)
        for method in TOLERANCE
    }


def _worker(rank, port, out_dir, device, job):
    """One rank: runs ``job(rank, device)`` and saves what it returns to a file.
    On CUDA both ranks share the one device: gloo all-reduces CUDA tensors too."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(job(rank, device), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(job, out_dir, device):
    """Run ``job`` on every rank; return what each rank saved, rank 0 first."""
    # The store lives here, on a free port (bound to port 0), so that it outlives both
    # ranks: hosted by rank 0, it could vanish while rank 1 still shuts down.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.start_processes(
        _worker, args=(store.port, str(out_dir), device, job), nprocs=WORLD_SIZE,
        start_method="spawn",
    )
    return [
        torch.load(Path(out_dir) / f"rank{rank}.pt", map_location=device)
        for rank in range(WORLD_SIZE)
    ]


def _free_port():
    """A port no one listens on now, found by binding port 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _relative_error(actual, expected):
    """The largest relative error over the parameter gradients."""
    return max(((a - e).norm() / e.norm()).item() for a, e in zip(actual, expected))


def test_ddp_gradients_equal_single_process(tmp_path, device):
    per_rank = _run_ranks(_ddp_gradients, tmp_path, device)
    model = _model(device)
    for method, tolerance in TOLERANCE.items():
        reference = _gradients(model, model, *_batch(device), method)
        for rank, saved in enumerate(per_rank):
            error = _relative_error(saved[method], reference)
            assert error < tolerance, (method, rank, error)


def _dropout_cnn(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Dropout2d(0.3),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ).double().to(device).eval()


def _analyse(model, images):
    """Per-image results that must not depend on how the data set is split."""
    uncertainty = MCDropout(model, n_samples=8, seed=1).uncertainty(images)
    unveiling = IterativeUnveiling(Saliency(model))
    unveiled = unveiling.unveil(images, target=1, n_iter=2, kernel_size=3)
    return {
        "mutual_information": uncertainty.mutual_information,
        "variation_ratio": uncertainty.variation_ratio,
        "unveiling_masks": unveiled.masks,
        "unveiling_scores": unveiled.scores,
    }


def _sharded_analysis(rank, device):
    """This rank's share of the data set, through DistributedSampler, by batches of 2."""
    images, _, _ = _batch(device)
    data = TensorDataset(torch.arange(BATCH_SIZE), images)
    sampler = DistributedSampler(data, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
    model = _dropout_cnn(device)
    loader = DataLoader(data, batch_size=2, sampler=sampler)
    parts = [(indices, _analyse(model, batch)) for indices, batch in loader]
    return {
        "indices": torch.cat([indices for indices, _ in parts]),
        **{key: torch.cat([results[key] for _, results in parts]) for key in parts[0][1]},
    }


def test_mc_dropout_and_unveiling_over_sharded_data_equal_single_process(tmp_path, device):
    per_rank = _run_ranks(_sharded_analysis, tmp_path, device)
    images, _, _ = _batch(device)
    reference = _analyse(_dropout_cnn(device), images)
    indices = torch.cat([saved["indices"] for saved in per_rank])
    assert sorted(indices.tolist()) == list(range(BATCH_SIZE))
    for key, expected in reference.items():
        gathered = torch.cat([saved[key] for saved in per_rank])
        expected = expected[indices.to(expected.device)]
        torch.testing.assert_close(gathered, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_ddp_example_runs_with_torchrun(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(EXAMPLE), "--quick", "--out", str(tmp_path / "figure.png"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert (tmp_path / "figure.png").exists()
