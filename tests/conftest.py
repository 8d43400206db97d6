import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
# The test networks are tiny: one CPU thread per process is faster than two threads fighting over two cores
# (measured 6-10x on this 2-core machine). Notebook kernels started by papermill inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "notebooks: runs a notebook through papermill (slow)")


@pytest.fixture(autouse=True)
def one_torch_thread():
    "One torch thread per test (re-set for each test: scanpy's neighbour graph changes torch's thread count)."
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
