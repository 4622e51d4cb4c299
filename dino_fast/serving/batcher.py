"""Dynamic batching: images of concurrent requests gathered into one model run.

Each image waits in a queue. The batcher takes the first, then whatever arrives within
``max_wait_ms`` of it, up to ``max_batch`` images; images of one shape run together (the model
takes any size, but one size per run: padding would change the attention, there is no mask), in
arrival order. The run happens in one worker thread, off the event loop, which meanwhile keeps
reading requests; the next batch is gathered while one runs. ``max_batch=1`` runs every image
alone: the one-at-a-time baseline.
"""
import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class BatcherStopped(RuntimeError):
    """An image submitted after :meth:`DynamicBatcher.stop` began."""


def group_by_shape(items: list, max_batch: int) -> list[list]:
    """``items`` (``(image, future)`` pairs) split into runs of one image shape, each at most
    ``max_batch`` long, in order of each shape's first arrival."""
    groups = collections.defaultdict(list)
    for item in items:
        groups[item[0].shape].append(item)
    return [group[i:i + max_batch] for group in groups.values()
            for i in range(0, len(group), max_batch)]


class DynamicBatcher:
    """Serves ``run(images [B, 3, H, W]) -> (attentions, features)`` to concurrent callers of
    :meth:`submit`. ``on_batch(size)`` is called with each run's batch size (for metrics).
    :meth:`start` and :meth:`stop` run inside the event loop; :meth:`stop` finishes every
    queued image first."""

    def __init__(self, run, max_batch: int, max_wait_ms: float, on_batch=None):
        self._run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1e3
        self._on_batch = on_batch or (lambda size: None)
        self._queue = collections.deque()
        self._arrived = asyncio.Event()
        self._stopping = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dino-fast-model")
        self._task = None
        self.in_flight = 0  # images submitted and not answered yet: queued, gathered or running

    async def start(self):
        """Start the batching task."""
        self._task = asyncio.create_task(self._serve())

    async def stop(self):
        """Run what is queued, then end the task and the worker thread."""
        self._stopping = True
        self._arrived.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown()

    async def submit(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(attentions [heads, N], features [dim])`` of each image ``[3, H, W]``."""
        if self._stopping:
            raise BatcherStopped("the server is shutting down")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self._queue.extend(zip(images, futures))
        self._arrived.set()
        self.in_flight += len(images)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self.in_flight -= len(images)

    async def _serve(self):
        while True:
            await self._wait(None)
            if not self._queue:  # stopping, nothing left
                return
            for group in group_by_shape(await self._gather(), self.max_batch):
                await self._run_group(group)

    async def _wait(self, timeout: float | None) -> bool:
        """Wait until an image is queued (or stopping); False when ``timeout`` passed first."""
        while not self._queue and not self._stopping:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return False
        return bool(self._queue)

    async def _gather(self) -> list:
        """The first queued image and those arriving within ``max_wait`` of it, at most
        ``max_batch``; callers that left (cancelled futures) are dropped."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        pending = []
        while len(pending) < self.max_batch:
            if not self._queue and not await self._wait(max(0.0, deadline - loop.time())):
                break
            if not self._queue:
                break
            item = self._queue.popleft()
            if not item[1].cancelled():
                pending.append(item)
        return pending

    async def _run_group(self, group: list):
        self._on_batch(len(group))
        batch = np.stack([image for image, _ in group])  # (B, 3, H, W)
        loop = asyncio.get_running_loop()
        try:
            attentions, features = await loop.run_in_executor(self._executor, self._run, batch)
        except Exception as err:  # every caller of this batch gets the failure
            for _, future in group:
                if not future.done():
                    future.set_exception(err)
            return
        for i, (_, future) in enumerate(group):
            if not future.done():  # done: cancelled, its client left
                future.set_result((attentions[i], features[i]))
