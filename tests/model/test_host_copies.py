"""Host -> device copies off the critical path (issue 9): on CPU they must change nothing."""

import torch

from tokenmill.model.host import to_device
from tokenmill.model.runner import select_rows


def test_to_device_on_cpu_keeps_values_and_dtypes():
    ints = to_device([3, 1, 4], "cpu")
    assert ints.dtype == torch.long and ints.tolist() == [3, 1, 4]
    floats = to_device([0.7, 1.0], torch.device("cpu"), torch.float32)
    assert torch.equal(floats, torch.tensor([0.7, 1.0]))  # what torch.tensor(floats) gives
    mask = torch.tensor([[True, False]])
    assert to_device(mask, "cpu") is mask  # a CPU tensor: no copy at all


def test_select_rows_contiguous_and_gathered_agree_with_indexing():
    hidden = torch.randn(7, 5)
    for rows in ([0, 1, 2, 3], [2, 3, 4], [6], [0, 2, 3], [4, 5, 1], [1, 1]):
        got = select_rows(hidden, rows)
        assert torch.equal(got, hidden[rows]), rows
    view = select_rows(hidden, [2, 3, 4])
    assert view.data_ptr() == hidden[2].data_ptr()  # a run of rows is a view, not a copy
    assert select_rows(hidden, []).shape == (0, 5)
