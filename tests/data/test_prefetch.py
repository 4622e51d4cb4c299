"""Batches copied to the device one step ahead (``dino_fast.data.prefetch``): the ordering logic
on the CPU; the CUDA side stream itself runs in the GPU suite."""
import torch

from dino_fast.data.prefetch import DeviceCopier, one_ahead


def test_the_next_item_starts_before_the_current_one_is_used():
    events = []

    def start(item):
        events.append(("start", item))
        return item

    def finish(item):
        events.append(("finish", item))
        return item * 10

    for got in one_ahead(range(3), start, finish):
        events.append(("use", got))
    assert events == [("start", 0), ("start", 1), ("finish", 0), ("use", 0), ("start", 2),
                      ("finish", 1), ("use", 10), ("finish", 2), ("use", 20)]
    assert list(one_ahead([], start, finish)) == []
    assert list(one_ahead([4], start, finish)) == [40]


def test_cpu_copier_converts_in_order_with_nothing_ahead():
    pulled = []

    def batches():
        for i in range(3):
            pulled.append(i)
            yield [torch.full((2, 3), float(i)), torch.zeros(1, 3)], torch.tensor([i, -1])

    copier = DeviceCopier(torch.device("cpu"), torch.float64)
    assert copier.stream is None
    for i, (crops, labels) in enumerate(copier(batches())):
        assert pulled == list(range(i + 1))  # the CPU path reads no batch ahead
        assert [c.dtype for c in crops] == [torch.float64] * 2 and crops[0][0, 0] == i
        assert labels.tolist() == [i, -1]
