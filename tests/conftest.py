import os

os.environ.setdefault("MPLBACKEND", "Agg")
# The test networks are tiny: one CPU thread per process is faster than two threads fighting over two cores
# (measured 6-10x on this 2-core machine). Notebook kernels started by papermill inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "notebooks: runs a notebook through papermill (slow)")
