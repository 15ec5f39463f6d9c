"""Every test run hashes into its own cache folder, never the user's ~/.cache/rflow; ``one_thread`` for
modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""

import os
import tempfile

import pytest

os.environ.setdefault("RFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="rflow-test-cache-"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread: two threads spin against each other on a busy 2-core CPU.
    The thread count is restored when the module is done."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
