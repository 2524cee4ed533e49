"""Timing shared by the benchmarks: interleaved runs, medians after warm-up."""

import statistics
import time

import torch


def synchronize(device) -> None:
    """Wait for queued CUDA work, so a timer measures it; nothing to wait for on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(functions, repeats, device):
    """Median seconds of each function over ``repeats`` runs after one warm-up run.

    The functions take turns within each repeat, so load from other processes falls
    on all of them alike.
    """
    times = {name: [] for name in functions}
    for _ in range(repeats + 1):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(runs[1:]) for name, runs in times.items()}
