import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Pin torch to one thread for a module, restored afterwards. Small convolutions gain nothing
    from intra-op threads, and on a busy 2-core machine their per-op barrier makes every op wait
    for a preempted thread."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
