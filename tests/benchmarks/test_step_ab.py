"""``benchmarks/step_ab.py``: another revision's step and this tree's, interleaved in one
process (the base a renamed copy of its package, with its own op namespace)."""
import math
import os
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def is_git_checkout() -> bool:
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          check=False).returncode == 0


@pytest.mark.skipif(not is_git_checkout(), reason="needs the git history of the source tree")
def test_head_against_this_tree_reports_paired_ratios(tmp_path, capsys):
    from benchmarks import step_ab
    threads = torch.get_num_threads()
    report = step_ab.main(["--base", "HEAD", "--rounds", "3", "--configs", "fast",
                           "--batch", "1", "--local_crops", "1", "--global_size", "32",
                           "--local_size", "16", "--out_dim", "64",
                           "--json", str(tmp_path / "ab.json")])
    import sys

    import dino_fast_ab
    base_step = sys.modules[step_ab.recipe("dino_fast_ab").TrainStep.__module__]
    assert not base_step.__file__.startswith(ROOT)  # the copy, not this tree
    assert hasattr(torch.ops.dino_fast_ab, "ema_")  # its ops in a namespace of their own
    assert len(report["times"]["base"]) == len(report["times"]["fast"]) == 3
    fast = report["rows"]["fast"]
    assert fast["rounds"] == 3 and 0 <= fast["faster_rounds"] <= 3
    assert fast["low"] <= fast["ratio"] <= fast["high"] and math.isfinite(fast["ratio"])
    assert "x base" in capsys.readouterr().out and (tmp_path / "ab.json").exists()
    assert torch.get_num_threads() == threads  # one thread while it measured, restored after
    assert dino_fast_ab._C is not None  # the base ran its C++ kernels, as this tree does
    with pytest.raises(SystemExit, match="already loaded"):  # its ops exist once a process
        step_ab.main(["--base", "HEAD", "--rounds", "2"])


def test_an_unknown_revision_is_refused():
    from benchmarks import step_ab
    with pytest.raises(SystemExit, match="is not a commit"):
        step_ab.main(["--base", "no-such-revision-0123", "--rounds", "2"])
