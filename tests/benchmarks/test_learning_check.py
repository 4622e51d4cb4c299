"""The learning check of benchmarks/learning_check.py as a slow test (about 15 minutes on 2 CPU
cores; CI leaves it out): DINO from scratch must raise leave-one-out 20-NN top-1 on the photo
stamps by at least MIN_GAIN points over the random initialisation (recorded: +10.5; collapsed
runs give <= 0). The collapse rule must not flag this healthy run."""
import os

import pytest

from benchmarks.learning_check import STAMPS, main
from dino_fast.monitoring.curves import read_log
from dino_fast.monitoring.health import first_warning_in_log

MIN_GAIN = 5.0


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(STAMPS),
                    reason="apt-get install -y --no-install-recommends tuxpaint-stamps-default")
def test_dino_raises_knn_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as the recorded run
    assert main(["--work_dir", str(tmp_path), "--min_gain", str(MIN_GAIN)]) >= MIN_GAIN
    log = read_log(str(tmp_path / "run" / "log.txt"))
    assert first_warning_in_log(log, out_dim=1024, start_epoch=10) is None  # 10 warm-up epochs
