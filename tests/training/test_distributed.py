"""``torchrun`` training with DistributedDataParallel on Gloo (CPU, 2 processes, 127.0.0.1 only)
against one process with the same global batch: the same student, teacher and center.

This holds without a special input path because the loader gives every image the same crops
whatever the world size, and rank r reads images r, r + 2, ... of each global batch: the two
runs see the same images per step, only the order inside the batch differs (the loss, the center
and the DDP-averaged gradient are means over the global batch). Drop-path draws differ per rank,
so it is off here. The student and teacher parameters are views of flat buffers (the fused EMA):
this also checks that DDP syncs gradients and broadcasts weights through such views.
"""
import json
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


# 8 images, global batch 4: two steps.
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    data = make_images(tmp_path / "images", 8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dino_fast.train", *TINY_RUN, "--data_path", data,
           "--batch_size_per_gpu", "2", "--output_dir", tmp_path / "ddp", *TWO_STEPS]
    ddp = run([str(c) for c in cmd], timeout=150)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_in_process("--data_path", data, "--batch_size_per_gpu", "4",
                   "--output_dir", tmp_path / "one", *TWO_STEPS)

    got, want = load(tmp_path / "ddp" / "checkpoint.pth"), load(tmp_path / "one" / "checkpoint.pth")
    # fp32 sums in another order; AdamW divides by sqrt(v), so for near-zero gradients the
    # reordering moves an element by a fraction of one step's lr (7.8e-6 here): 2.5e-6 seen.
    assert_same_state(got, want, atol=4e-6)
    assert got["epoch"] == want["epoch"] == 1
    # Rank 0 alone logs and writes: one log line, one banner, DDP's `module.` names as official.
    with open(tmp_path / "ddp" / "log.txt") as f:
        lines = [json.loads(line) for line in f]
    assert [entry["epoch"] for entry in lines] == [0]
    assert ddp.stdout.count("2 process(es)") == 1
    raw = torch.load(tmp_path / "ddp" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert all(k.startswith("module.") for k in raw["student"])
    assert sorted(os.listdir(tmp_path / "ddp")) == ["checkpoint.pth", "log.txt"]



@pytest.mark.slow
def test_torch_distributed_launch_runs_training(tmp_path):
    # The deprecated launcher of older tutorials passes --local-rank=0 (hyphen) to the script.
    data = make_images(tmp_path / "images", 4)
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "dino_fast.train", *TINY_RUN, "--data_path", data, "--batch_size_per_gpu", "4",
           "--max_steps", "1", "--output_dir", tmp_path / "out", *TWO_STEPS]
    launched = run([str(c) for c in cmd], timeout=150)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert load(tmp_path / "out" / "checkpoint.pth")["epoch"] == 1
