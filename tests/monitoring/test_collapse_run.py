"""A real collapse, live (slow): vit_tiny on the bundled photos with a high learning rate drifts
to the uniform collapse (teacher entropy back up to ~0.94 ln K, KL down to ~0.2 nats, the loss
back near ln K), with ``--norm_last_layer false`` as in the learning check's failed attempt.
Training must name the collapse once and, with ``--stop_on_collapse``, stop with a checkpoint.
About 10 epochs of 4 steps on one CPU thread."""
import json
import sys

import pytest
import torch

from tests._training import run

COMMAND = ["-m", "dino_fast.train", "--arch", "vit_tiny", "--out_dim", "1024", "--epochs", "25",
           "--warmup_epochs", "3", "--batch_size_per_gpu", "8", "--lr", "0.02",
           "--momentum_teacher", "0.99", "--global_crops_size", "64", "--local_crops_size", "32",
           "--local_crops_number", "4", "--global_crops_scale", "0.25", "1",
           "--local_crops_scale", "0.05", "0.25", "--drop_path_rate", "0", "--num_workers", "0",
           "--saveckp_freq", "0", "--loader", "torch", "--device", "cpu", "--seed", "0",
           "--no-curves", "--norm_last_layer", "false", "--stop_on_collapse"]


@pytest.mark.slow
def test_norm_last_layer_false_on_bundled_photos_is_flagged(tmp_path):
    result = run([sys.executable, *COMMAND, "--output_dir", str(tmp_path)], timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("WARNING: uniform collapse at epoch") == 1, result.stdout
    assert "stopped by --stop_on_collapse" in result.stdout
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "log.txt")]
    ckpt = torch.load(tmp_path / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == epochs[-1] + 1 < 25  # stopped early, with its checkpoint
