"""Test-wide settings: one intra-op thread (tests use tiny tensors, where thread start-up dominates
and oversubscribed cores of a shared CI machine slow everything down), and a private cache."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LIT_MPDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
