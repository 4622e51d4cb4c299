"""The dynamic batcher: concurrent images share runs of one shape, at most ``max_batch``, with
the results of one-at-a-time runs; a failed run fails its callers only; stop drains the queue."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dino_fast.serving.batcher import BatcherStopped, DynamicBatcher, group_by_shape  # noqa: E402


class RecordingModel:
    """A stand-in model whose outputs depend on each image alone; records each run's batch."""

    def __init__(self, fail_first: bool = False):
        self.batches, self.fail_first = [], fail_first

    def __call__(self, images):
        self.batches.append(images.shape)
        if self.fail_first and len(self.batches) == 1:
            raise MemoryError("out of memory in this run")
        return images.mean(axis=(2, 3)), images.reshape(len(images), -1)[:, :4] * 2


def image(value: float, shape=(3, 32, 48)):
    return np.full(shape, value, np.float32) + np.arange(shape[-1], dtype=np.float32)


async def serve(model, requests, max_batch=4, max_wait_ms=50.0):
    """Submit each request (a list of images) concurrently; the answers, in order."""
    batcher = DynamicBatcher(model, max_batch, max_wait_ms)
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests),
                                     return_exceptions=True)
    finally:
        await batcher.stop()


def test_concurrent_images_share_runs_with_one_at_a_time_results():
    model = RecordingModel()
    requests = [[image(i)] for i in range(5)] + [[image(10), image(11)]]
    answers = asyncio.run(serve(model, requests, max_batch=4))
    assert [shape[0] for shape in model.batches] == [4, 3]
    for request, answer in zip(requests, answers):
        for single, (attentions, features) in zip(request, answer):
            alone = RecordingModel()(single[None])
            np.testing.assert_array_equal(attentions, alone[0][0])
            np.testing.assert_array_equal(features, alone[1][0])


def test_images_of_different_shapes_run_apart():
    model = RecordingModel()
    requests = [[image(0)], [image(1, (3, 16, 16))], [image(2)], [image(3, (3, 16, 16))]]
    answers = asyncio.run(serve(model, requests))
    assert sorted(model.batches) == [(2, 3, 16, 16), (2, 3, 32, 48)]
    assert answers[1][0][0].shape == (3,)


def test_max_batch_1_runs_every_image_alone():
    model = RecordingModel()
    asyncio.run(serve(model, [[image(i)] for i in range(3)], max_batch=1))
    assert [shape[0] for shape in model.batches] == [1, 1, 1]


def test_a_failed_run_fails_its_callers_and_the_next_run_serves():
    model = RecordingModel(fail_first=True)

    async def scenario():
        batcher = DynamicBatcher(model, 4, 20.0)
        await batcher.start()
        first = await asyncio.gather(batcher.submit([image(0)]), batcher.submit([image(1)]),
                                     return_exceptions=True)
        second = await batcher.submit([image(2)])
        await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(answer, MemoryError) for answer in first)
    assert second[0][0].shape == (3,)


def test_stop_runs_what_is_queued_then_refuses():
    model = RecordingModel()

    async def scenario():
        batcher = DynamicBatcher(model, 2, 1000.0)
        await batcher.start()
        pending = [asyncio.ensure_future(batcher.submit([image(i)])) for i in range(3)]
        await asyncio.sleep(0)  # queued
        await batcher.stop()
        with pytest.raises(BatcherStopped, match="shutting down"):
            await batcher.submit([image(9)])
        return await asyncio.gather(*pending)

    answers = asyncio.run(scenario())
    assert len(answers) == 3 and sum(shape[0] for shape in model.batches) == 3


def test_group_by_shape_keeps_arrival_order_and_splits_long_groups():
    items = [(np.zeros(shape), name) for shape, name in
             [((2,), "a"), ((3,), "b"), ((2,), "c"), ((2,), "d")]]
    groups = group_by_shape(items, max_batch=2)
    assert [[name for _, name in group] for group in groups] == [["a", "c"], ["d"], ["b"]]
