"""Fixtures shared by tests/ (the project-wide set-up is ../conftest.py)."""
import pytest
import torch


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run the test at 1 and at 2 torch threads (indirect parametrization picks others),
    restoring the thread count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
