"""The fast step's properties under FSDP2 (``TrainStep(sharded=True)``), on two Gloo processes
(CPU, a file rendezvous): no host sync in a steady-state step, a non-finite step on one process
that changes no shard on any process and that both report at the same check, and the state
bytes each process holds as ``benchmarks/memory.py`` predicts them."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.memory import state_bytes
from dino_fast.models import MultiCropWrapper
from dino_fast.profiling.dispatch_count import DispatchCounter
from dino_fast.training.loss import DINOLoss
from dino_fast.training.optim import build_optimizer, get_params_groups
from dino_fast.training.sharding import (
    ShardedTeacherEMA,
    local,
    local_state_bytes,
    shard_student_and_teacher,
)
from dino_fast.training.step import NonFiniteLossError, TrainStep
from tests.training.test_train_step import NCROPS, K, backbone_and_head, make_crops

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")
WORLD = 2


def sharded_step() -> TrainStep:
    """The tiny TrainStep of test_train_step.py (drop path on), sharded over the processes."""
    student = MultiCropWrapper(*backbone_and_head(drop_path_rate=0.1))
    teacher = MultiCropWrapper(*backbone_and_head())
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    student, teacher = shard_student_and_teacher(student, teacher, torch.device("cpu"), "fp32")
    optimizer = build_optimizer("adamw", get_params_groups(student))
    return TrainStep(student, teacher, DINOLoss(K, NCROPS, 0.04, 0.04, 0, 2), optimizer,
                     ShardedTeacherEMA(student, teacher), clip_grad=0.5, freeze_last_layer=0,
                     sharded=True)


def shards(step) -> dict:
    """Copies of this process's shards of the student and the teacher, and the center."""
    return {**{f"student.{name}": local(p.data).clone()
               for name, p in step.student.named_parameters()},
            **{f"teacher.{name}": local(p.data).clone()
               for name, p in step.teacher.named_parameters()},
            "center": step.dino_loss.center.clone()}


def worker(rank: int, folder: str):
    """One process: the measurements of the tests below, written to ``rank<N>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=WORLD)
    try:
        step, crops, result = sharded_step(), make_crops(rank), {}
        for it in range(2):  # warm-up: optimizer state, first-call caches
            step(crops, 0, 1e-3, 0.04, 0.99, it)
        with DispatchCounter() as counter:
            for it in range(2, 5):
                step(crops, 0, 1e-3, 0.04, 0.99, it)
        result.update(ops=counter.total_ops, syncs=dict(counter.syncs))
        result["state_bytes"] = (local_state_bytes(step.student, step.optimizer)
                                 + local_state_bytes(step.teacher))
        step.check_finite()
        before = shards(step)
        bad = make_crops(rank)
        if rank == 0:
            bad[3][0, 0, 0, 0] = float("nan")  # one local crop pixel, on one process
        step(bad, 1, 1e-3, 0.04, 0.99, 7)
        step(make_crops(rank), 1, 1e-3, 0.04, 0.99, 8)  # after a bad one, skipped too
        after = shards(step)
        result["changed"] = [name for name in before if not torch.equal(before[name], after[name])]
        try:
            step.check_finite()
            result["report"] = None
        except NonFiniteLossError as err:
            result["report"] = str(err)
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # no interpreter finalization with FSDP2 modules alive: see run_command


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    """Each process's measurements, from one two-process run."""
    folder = str(tmp_path_factory.mktemp("fsdp_step"))
    mp.spawn(worker, args=(folder,), nprocs=WORLD, join=True)
    results = []
    for rank in range(WORLD):
        with open(os.path.join(folder, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def test_no_host_sync_in_the_steady_state_fsdp2_step(results):
    for rank, result in enumerate(results):
        assert result["ops"] > 0 and result["syncs"] == {}, (rank, result["syncs"])


def test_a_non_finite_step_on_one_process_changes_no_shard_and_both_report_it(results):
    """NaN in one pixel of rank 0's crops: the reduce-scattered gradients are NaN on both
    processes, so both skip the step (and the next), and both name step 7 at the check."""
    for rank, result in enumerate(results):
        assert result["changed"] == [], (rank, result["changed"][:5])
        assert result["report"] is not None, rank
        assert "at step 7 (epoch 1)" in result["report"], (rank, result["report"])
    assert "loss is nan" in results[0]["report"]  # rank 1's own loss was finite


def test_state_bytes_per_process_as_the_memory_benchmark_predicts(results):
    """Parameters, gradients and AdamW moments of the student plus the teacher's parameters
    (all fp32), FSDP2's dim-0 shards with the padding of uneven ones on the first ranks."""
    model = MultiCropWrapper(*backbone_and_head())
    for rank, result in enumerate(results):
        want = sum(state_bytes(model, WORLD, "fsdp2", rank=rank).values())
        assert result["state_bytes"] == want, rank
