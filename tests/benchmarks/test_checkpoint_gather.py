"""benchmarks/checkpoint_gather.py under torchrun on two Gloo processes, at a tiny size: the row,
and a file whose size is the gathered state that ``benchmarks/memory.py`` counts."""
import sys

import pytest
import torch.distributed as dist

from benchmarks.memory import state_bytes, student
from tests._training import free_port, run

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")


def test_gather_row_and_file_size(tmp_path):
    output = tmp_path / "gather.md"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "benchmarks.checkpoint_gather", "--arch", "vit_tiny", "--out_dim", "256",
           "--output", str(output)]
    done = run(cmd, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    row = output.read_text().splitlines()[-1].split("|")[1:-1]
    arch, out_dim, processes, gather_s, save_s, file_gib = (cell.strip() for cell in row[:6])
    assert (arch, out_dim, processes) == ("vit_tiny", "256", "2")
    assert float(gather_s) > 0 and float(save_s) > 0
    # student, teacher and the two AdamW moments, fp32, in one file
    whole = state_bytes(student("vit_tiny", 256), 1)
    want = (whole["params"] + whole["teacher"] + whole["adamw"]) / 2 ** 30
    assert float(file_gib) == pytest.approx(want, rel=0.05)
