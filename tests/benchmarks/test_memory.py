"""benchmarks/memory.py on its --quick settings: the tables and their invariants."""
import pytest
import torch

from benchmarks import memory
from dino_fast.models import vit_tiny


def test_quick_run_tables(tmp_path):
    memory.main(["--quick", "--output", str(tmp_path / "memory.md")])
    text = (tmp_path / "memory.md").read_text()
    assert "## activations" in text and "## state" in text
    activations, state, _ = memory.run(quick=True)
    ratio = {row["mode"]: row["ratio_to_none"] for row in activations}
    assert ratio["none"] == 1 and ratio["blocks"] < ratio["selective"] < 1, ratio
    row = state[0]
    assert row["total_MiB"] == pytest.approx(sum(row[f"{k}_MiB"] for k in
                                                 ("params", "grads", "adamw", "teacher")))
    assert row["adamw_MiB"] == 2 * row["grads_MiB"] and row["teacher_MiB"] == row["params_MiB"]


def test_state_bytes_of_a_ddp_replica():
    vit = vit_tiny()
    params = sum(p.numel() for p in vit.parameters()) * 4
    assert memory.state_bytes(vit, 8) == {"params": params, "grads": params,
                                          "adamw": 2 * params, "teacher": params}
    with pytest.raises(NotImplementedError, match="fsdp2"):
        memory.state_bytes(vit, 8, "fsdp2")
    with torch.device("meta"):
        assert memory.state_bytes(vit_tiny(), 2) == memory.state_bytes(vit, 2)
