import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", parent=settings.get_profile("default"), derandomize=True, print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        action="append",
        default=None,
        help="device to run device tests on (repeatable); default: cpu, plus cuda when available",
    )
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    requested = config.getoption("--device") or []
    if any(torch.device(d).type == "cuda" for d in requested) and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {' '.join(requested)}: this torch has no CUDA device")
    config.addinivalue_line("markers", "slow: long experiment, run with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one CPU thread: on tiny tensors extra threads only add
    synchronisation, which dominates (10x) when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _devices(config):
    requested = config.getoption("--device")
    if requested:
        return requested
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _devices(metafunc.config))
