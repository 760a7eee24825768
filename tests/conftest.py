import os

import pytest
import torch
from hypothesis import settings

# property tests draw the same examples on every run: CI is reproducible, and a failure seen once is seen again
settings.register_profile("repvgg", derandomize=True)
settings.load_profile("repvgg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on two cores: one thread each (and in the processes they start), so the
    # workers do not oversubscribe the machine
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: more threads only add contention on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
