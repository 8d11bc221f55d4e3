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


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Session-wide, so module-scoped fixtures (and the sweeps they start in subprocesses) see it too: a
    function-scoped one is set up after them, and a module fixture's sweep then read the repository's own
    results/cache/fid, which anything run from the repository root may have written — while the test
    compared with it, started later, computed its reference features afresh (issue 6's FID drift)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIT_MPDIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield
