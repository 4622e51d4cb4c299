"""benchmarks/memory.py on its --quick settings: the tables and their invariants."""
import pytest
import torch

from benchmarks import memory
from dino_fast.models import vit_tiny


def test_quick_run_tables(tmp_path):
    memory.main(["--quick", "--output", str(tmp_path / "memory.md")])
    text = (tmp_path / "memory.md").read_text()
    assert "## activations" in text and "## state" in text and "## fits" in text
    activations, state, _ = memory.run(quick=True)
    ratio = {row["mode"]: row["ratio_to_none"] for row in activations}
    assert ratio["none"] == 1 and ratio["blocks"] < ratio["selective"] < 1, ratio
    recompute = {row["mode"]: row["recompute_MiB_per_image"] for row in activations}
    none = activations[0]["MiB_per_image"]
    assert recompute == {"none": 0, "blocks": none / 12, "selective": none / 12}  # 12 blocks
    ddp, *fsdp2 = state
    for row in state:
        assert row["total_MiB"] == pytest.approx(sum(row[f"{k}_MiB"] for k in
                                                     ("params", "grads", "adamw", "teacher")))
        assert row["teacher_MiB"] == row["params_MiB"]
    assert ddp["sharding"] == "ddp" and ddp["share_of_ddp"] == 1
    assert [row["world_size"] for row in fsdp2] == [2, 4, 8]
    shares = [row["share_of_ddp"] for row in fsdp2]  # at least 1 / world: the padding rows
    assert all(1 / row["world_size"] <= row["share_of_ddp"] < 1.1 / row["world_size"]
               for row in fsdp2), shares


def test_fits_leave_room_for_the_batch():
    """The largest batch of each row fits its GPU, and one more image would not."""
    activations = [{"arch": "a", "mode": "none", "MiB_per_image": 80.0, "MiB_per_batch": 50.0,
                    "recompute_MiB_per_image": 20.0}]
    state = [{"arch": "a", "sharding": "ddp", "world_size": 1, "total_MiB": 1000.0},
             {"arch": "a", "sharding": "fsdp2", "world_size": 2, "total_MiB": 500.0}]
    ddp, fsdp2 = memory.fit_rows(activations, state)
    fixed = 1000 + 50 + memory.RESERVE_GIB * 1024
    assert ddp["batch_16GiB"] * 100 <= 16 * 1024 - fixed < (ddp["batch_16GiB"] + 1) * 100
    assert fsdp2["batch_16GiB"] == ddp["batch_16GiB"] + 5  # 500 MiB less state
    assert fsdp2["world_size"] == 2


def test_state_bytes_of_a_ddp_replica():
    vit = vit_tiny()
    params = sum(p.numel() for p in vit.parameters()) * 4
    tensors = len(list(vit.parameters()))
    assert memory.state_bytes(vit, 8) == {"params": params, "grads": params,
                                          "adamw": 2 * params + 4 * tensors, "teacher": params}
    with torch.device("meta"):
        assert memory.state_bytes(vit_tiny(), 2) == memory.state_bytes(vit, 2)
    with pytest.raises(ValueError, match="fsdp1"):
        memory.state_bytes(vit, 8, "fsdp1")


def test_fsdp2_shards_split_the_first_dimension_as_torch_chunk():
    """A [10, 3] parameter over 4 processes: chunks of 3, 3, 3 and 1 rows (torch.chunk); a
    [2] one over 4: 1, 1, 0, 0 elements. Ranks together hold the whole state once."""
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(10, 3)),
                                    torch.nn.Parameter(torch.zeros(2))])
    params = [memory.state_bytes(model, 4, "fsdp2", rank)["params"] for rank in range(4)]
    assert params == [4 * (9 + 1), 4 * (9 + 1), 4 * 9, 4 * 3]
    whole = memory.state_bytes(model, 1)
    assert sum(memory.state_bytes(model, 4, "fsdp2", rank)["grads"] for rank in range(4)) \
        == whole["grads"]
