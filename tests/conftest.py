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


@pytest.fixture
def fixed_counts():
    "120 cells x 40 genes of NB counts from NumPy alone (no simulator), for the tests that reproduce recorded outputs."
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    rng = np.random.default_rng(42)
    n, g = 120, 40
    types = rng.integers(0, 3, n)
    means = rng.gamma(1.5, 3.0, size=(3, g))
    lib = rng.uniform(0.5, 1.5, size=(n, 1))
    X = rng.negative_binomial(2, 2 / (2 + means[types] * lib)).astype(np.float32)
    X[:, 0] += 1
    X[0, :] += 1
    a = ad.AnnData(sp.csr_matrix(X))
    a.layers["counts"] = a.X.copy()
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"g{j}" for j in range(g)]
    return a
