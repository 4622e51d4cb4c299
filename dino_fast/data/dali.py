"""The NVIDIA DALI multi-crop loader: same contract, files, order and sharding as the torch loader.

Each epoch the rank's file list comes from :class:`~dino_fast.data.sampling.EpochPlan` (the very
list and permutation the torch loader uses), is handed to DALI's file reader in that order (a
shard set's samples to its WebDataset reader, through index files written for the epoch that
list them in that order), and the graph of :mod:`dino_fast.data.dali_pipeline` decodes and crops
it, on the GPU when the training device is CUDA (``mixed`` decoding), else in DALI's CPU-only
mode (``device_id=None``, one single-threaded pipeline per thread on interleaved batches). The
pipelines are rebuilt per epoch with seeds from ``(seed, epoch, rank)``, so an epoch's crops do
not depend on the epochs before it; in CPU-only mode they also depend on the thread count (the
same seed and thread count give the same crops).

Bad data: when DALI fails on a batch, the batch's files (and the prefetched ones after it) are
decoded with PIL; a file PIL cannot decode either raises :class:`BadImageError` naming it, or,
with ``skip_bad_images``, is replaced by the next readable image (as the torch loader does) and
the pipeline restarts at that batch.
"""
import tempfile

import torch

from dino_fast.cli.errors import MissingDependencyError

from .augment import ViewSpec
from .folder import BadImageError, ImageDataset
from .sampling import EpochPlan, epoch_seed

INSTALL_HINT = "pip install 'dino-fast[dali]'"
_PREFETCH = 2  # DALI's default prefetch queue depth: batches each pipeline may decode ahead


def dali_available() -> bool:
    """True when NVIDIA DALI imports."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # noqa: BLE001 (missing, or its CUDA libraries fail to load)
        return False
    return True


def _import_pipeline():
    try:
        from . import dali_pipeline
    except ImportError as err:
        raise MissingDependencyError(
            f"--loader dali needs NVIDIA DALI, which does not import here ({err}). Install it "
            f"with: {INSTALL_HINT} (CUDA 13 wheels; for CUDA 12 use "
            "pip install nvidia-dali-cuda120), or use --loader torch.") from err
    return dali_pipeline


class DaliLoader:
    """Multi-crop batches from a DALI pipeline (see :func:`dino_fast.data.build_loader`)."""

    kind = "dali"

    def __init__(self, dataset: ImageDataset, plan: EpochPlan, specs: list[ViewSpec],
                 num_threads: int, device: torch.device, dtype: torch.dtype):
        self._graph = _import_pipeline()
        self.dataset, self.plan, self.specs = dataset, plan, specs
        self.device, self.dtype, self.num_threads = torch.device(device), dtype, num_threads
        self.epoch, self.first_step = 0, 0
        self._labels = torch.tensor([label for _, label in dataset.samples])
        self._index_files = tempfile.TemporaryDirectory(prefix="dino_fast_dali_")  # shards'

    def __len__(self) -> int:
        return self.plan.steps

    def set_epoch(self, epoch: int, first_step: int = 0):
        """Select the epoch whose order and crops the next iteration yields, from
        ``first_step`` (the steps before it are still run, so the crops are those of an
        uninterrupted epoch, but not copied out)."""
        self.epoch, self.first_step = epoch, first_step

    def __iter__(self):
        batch = self.plan.batch_size
        bad = self.dataset.bad_files  # found in earlier epochs: replaced up front, no restart
        order = [self.dataset.readable_index(i) if self.dataset.samples[i][0] in bad else i
                 for i in self.plan.rank_indices(self.epoch).tolist()]
        step, start, pipes = 0, 0, None
        while step < len(self):
            if pipes is None:
                start, pipes = step, self._pipelines(order, step)
            try:
                outputs = pipes[(step - start) % len(pipes)].run()
            except RuntimeError as err:  # DALI reports operator failures as RuntimeError
                self._replace_bad_files(order, step, len(pipes), err)
                pipes = None
                continue
            if step >= self.first_step:
                yield self._to_torch(outputs, order[step * batch:(step + 1) * batch])
            step += 1

    def _pipelines(self, order: list[int], start: int) -> list:
        """Pipelines for the batches from step ``start`` on. On a GPU one pipeline with every
        thread; in CPU-only mode one single-threaded pipeline per thread, pipeline ``p`` taking
        the steps ``start + p``, ``start + p + n``, ... (DALI's thread pool waits for all of its
        threads after each operator, and crops of varying size leave threads idle there: on two
        cores, two 1-thread pipelines gave 88 images/s where one 2-thread pipeline gave 75)."""
        gpu = self.device.type == "cuda"
        count = min(1 if gpu else self.num_threads, len(self) - start)
        batch, pipes = self.plan.batch_size, []
        base_seed = epoch_seed(self.plan.seed, self.epoch, self.plan.rank)
        for first in range(start, start + count):
            steps = range(first, len(self), count)
            indices = [i for s in steps for i in order[s * batch:(s + 1) * batch]]
            source = self.dataset.dali_source(indices, self._index_files.name, f"pipe{first}")
            seed = (base_seed + first) % 2**31
            pipe = self._graph.multicrop_pipeline(
                source=source, specs=self.specs, gpu=gpu, half=self.dtype == torch.float16,
                batch_size=batch, num_threads=self.num_threads if gpu else 1, seed=seed,
                prefetch_queue_depth=_PREFETCH,
                device_id=self._device_id() if gpu else None)
            pipe.build()
            pipes.append(pipe)
        return pipes

    def _device_id(self) -> int:
        index = self.device.index
        return torch.cuda.current_device() if index is None else index

    def _to_torch(self, outputs, indices: list[int]):
        from nvidia.dali.plugin.pytorch import feed_ndarray
        crops = []
        for out in outputs:
            dense = out.as_tensor()
            host_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
            crop = torch.empty(dense.shape(), dtype=host_dtype, device=self.device)  # (B, 3, H, W)
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            feed_ndarray(dense, crop, cuda_stream=stream)
            crops.append(crop.to(self.dtype))
        return crops, self._labels[indices].to(self.device, non_blocking=True)

    def _replace_bad_files(self, order: list[int], step: int, pipelines: int,
                           err: RuntimeError):
        """Find the files DALI failed on with PIL (in the batches that ``pipelines`` pipelines
        may have read ahead); raise naming one, or replace them in ``order`` when skipping. A
        failure PIL cannot reproduce is re-raised with the files."""
        batch = self.plan.batch_size
        ahead = (1 + _PREFETCH) * pipelines
        window = range(step * batch, min(len(order), (step + ahead) * batch))
        replaced = False
        for pos in window:
            try:
                found = self.dataset.readable_index(order[pos])
            except BadImageError as bad:
                raise bad from err
            replaced |= found != order[pos]
            order[pos] = found
        if not replaced:
            files = [self.dataset.name(self.dataset.samples[order[p]][0]) for p in window]
            raise RuntimeError(f"DALI failed on step {step} of epoch {self.epoch}, but PIL "
                               f"decodes all of its files {files}: {err}") from err
