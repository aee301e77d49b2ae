"""The memory plan's measured part: the peak bytes of tensors alive at once (memory_plan.py)."""

from __future__ import annotations

import torch

from parityrl.memory_plan import peak_tensor_bytes

MIB = 2**20


def test_the_peak_counts_new_tensors_alive_at_once_and_no_view_or_earlier_tensor():
    earlier = torch.zeros(MIB // 4)  # made before: not counted, nor are its views

    def three_alive() -> None:
        a = torch.ones(MIB // 4)
        b = a * 2
        c = b + earlier.t()  # earlier's view is no allocation
        c.add_(1)  # in place: nothing new
        assert a.sum() and c.sum()

    assert peak_tensor_bytes(three_alive) == 3 * MIB + 2 * 4  # the two sums: 4 bytes each

    def one_at_a_time() -> None:
        for _ in range(100):
            torch.ones(MIB // 4).mul_(2)

    # A tensor freed is gone by the next op: one at a time is one alive.
    assert peak_tensor_bytes(one_at_a_time) == MIB
