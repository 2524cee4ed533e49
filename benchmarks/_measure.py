"""Measurements shared by the benchmarks (and the memory tests): interleaved runs,
medians after warm-up, and the peak tensor memory of one call."""

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile


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


@contextlib.contextmanager
def _stderr_silenced():
    """The profiler's C++ side prints a debug line to the process's stderr at every
    start and stop; send file descriptor 2 to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mib(call, device) -> float:
    """Peak tensor memory allocated during one call, above what was live before it:
    the allocator's peak on CUDA, the PyTorch profiler's allocation events on CPU."""
    device = torch.device(device)
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # Profiled twice, the second run kept: a process's first profiled call records
    # one-off allocations (measured: 18 MiB against 10 MiB for a small ResNet step).
    for _ in range(2):
        with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            call()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace_file:
        profiler.export_chrome_trace(trace_file.name)
        with open(trace_file.name) as trace:
            events = json.load(trace)["traceEvents"]
    # One "[memory]" event per allocation (+bytes) and free (-bytes), in time order.
    changes = sorted(
        (event["ts"], event["args"]["Ev Idx"], event["args"]["Bytes"])
        for event in events
        if event.get("name") == "[memory]"
    )
    live = peak = 0
    for _, _, change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2**20
