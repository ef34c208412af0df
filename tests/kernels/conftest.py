"""Kernel tests run single-threaded: their tensors are tiny, and OpenMP threads spinning against other jobs on a
shared 2-core machine slow small ops down a hundredfold."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
