"""Shared test set-up: every test runs torch on one thread. The tensors here are tiny, and on a
busy 2-core machine thread start-up costs more than the arithmetic."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
