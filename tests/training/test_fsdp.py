"""``--sharding fsdp2`` through ``torchrun`` on Gloo (CPU, 127.0.0.1 only): the same run as DDP
from the same initialisation, one checkpoint file in the official layout, and resumes across
world sizes and shardings.

12 images, global batch 6: two steps, no lr warm-up and no last-layer freezing, so both steps
move every weight; drop path off (its draws differ per rank, see test_distributed.py).

Tolerance: FSDP2 reduce-scatters the gradients where DDP all-reduces them, and the clipping norms
are sums of the shards' squared norms: the same fp32 values summed in another order (a few ulp),
which AdamW's division by sqrt(v) can grow for near-zero gradients to a fraction of one step's lr
(1.6e-5 here). Within a world size 1e-7 is seen; across world sizes (other images per rank) as in
test_distributed.py, 4e-6.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

from tests._training import (
    TINY_RUN,
    TWO_STEPS,
    assert_same_state,
    free_port,
    load,
    make_images,
    run,
    run_in_process,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

GLOBAL_BATCH = 6
SAME_WORLD_ATOL, OTHER_WORLD_ATOL = 1e-6, 4e-6


def torchrun(processes: int, data, out, *flags):
    """``python -m dino_fast.train`` on ``processes`` Gloo processes, global batch 6."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "dino_fast.train",
           *TINY_RUN, "--data_path", data, "--batch_size_per_gpu", GLOBAL_BATCH // processes,
           "--output_dir", out, *TWO_STEPS, *flags]
    done = run([str(c) for c in cmd], timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return load(os.path.join(out, "checkpoint.pth"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name, processes, *flags)``: a training run's checkpoint, each run done once."""
    root = tmp_path_factory.mktemp("fsdp")
    data = make_images(root / "images", 2 * GLOBAL_BATCH)
    done = {}

    def get(name, processes, *flags):
        if name not in done:
            done[name] = torchrun(processes, data, root / name, *flags)
        return done[name]

    get.root, get.data = root, data
    return get


def ddp(runs):
    return runs("ddp2", 2)


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
def test_fsdp2_equals_ddp_on_two_processes(runs, checkpointing):
    got = runs(f"fsdp2-{checkpointing}", 2, "--sharding", "fsdp2",
               "--activation_checkpointing", checkpointing)
    assert_same_state(got, ddp(runs), atol=SAME_WORLD_ATOL)
    want_optimizer = ddp(runs)["optimizer"]
    assert got["optimizer"]["param_groups"] == want_optimizer["param_groups"]
    for index, state in want_optimizer["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(got["optimizer"]["state"][index][key], value,
                                       rtol=0, atol=SAME_WORLD_ATOL)


def test_the_fsdp2_checkpoint_is_one_file_in_the_official_layout(runs):
    runs("fsdp2-none", 2, "--sharding", "fsdp2", "--activation_checkpointing", "none")
    out = runs.root / "fsdp2-none"
    assert sorted(os.listdir(out)) == ["checkpoint.pth", "log.txt"]
    raw = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    want = torch.load(runs.root / "ddp2" / "checkpoint.pth", map_location="cpu",
                      weights_only=False)
    for part in ("student", "teacher"):  # plain full tensors under DDP's names
        assert list(raw[part]) == list(want[part])
        assert all(type(v) is torch.Tensor and v.shape == want[part][k].shape
                   for k, v in raw[part].items())
    assert sorted(raw["optimizer"]["state"]) == list(range(len(raw["optimizer"]["state"])))
    assert raw["world_size"] == 2 and raw["args"]["sharding"] == "fsdp2"


def stopped_after_one_step(runs, name, processes, *flags):
    """A checkpoint written after step 0 of epoch 0 (as a stop signal there writes it)."""
    out = runs.root / name
    runs(name, processes, "--max_steps", 1, *flags)  # step 0 has the same lr, wd and momentum
    ckpt = load(out / "checkpoint.pth")
    ckpt.update(epoch=0, iteration=1)
    torch.save(ckpt, out / "checkpoint.pth")
    (out / "log.txt").unlink()
    return out


def test_fsdp2_on_two_processes_resumes_in_one_process_with_ddp(runs):
    out = stopped_after_one_step(runs, "fsdp2-to-one", 2, "--sharding", "fsdp2")
    run_in_process("--data_path", runs.data, "--batch_size_per_gpu", GLOBAL_BATCH,
                   "--output_dir", out, *TWO_STEPS)
    assert_same_state(load(out / "checkpoint.pth"), ddp(runs), atol=OTHER_WORLD_ATOL)


@pytest.mark.slow
def test_fsdp2_on_two_processes_resumes_on_three(runs):
    out = stopped_after_one_step(runs, "fsdp2-to-three", 2, "--sharding", "fsdp2")
    got = torchrun(3, runs.data, out, "--sharding", "fsdp2")
    assert_same_state(got, ddp(runs), atol=OTHER_WORLD_ATOL)


@pytest.mark.slow
def test_fsdp2_equals_ddp_on_three_processes_with_checkpointed_blocks(runs):
    want = runs("ddp3", 3)
    got = runs("fsdp2-3-blocks", 3, "--sharding", "fsdp2", "--activation_checkpointing", "blocks")
    assert_same_state(got, want, atol=SAME_WORLD_ATOL)
