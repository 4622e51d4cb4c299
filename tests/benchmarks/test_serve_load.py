"""``benchmarks/serve_load.py`` on a tiny export, briefly: every setting answers every request
with 200, counts them, reads the server's memory and the batches it ran, and the server exits 0
on SIGTERM. (The figures themselves are in benchmarks/results/, never asserted.)"""
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from benchmarks.serve_load import main  # noqa: E402
from tests._serve import tiny_export  # noqa: E402


def test_serve_load_runs_both_settings_without_errors(tmp_path):
    model = tiny_export(tmp_path / "tiny.onnx")
    rows = main(["--model", model, "--image_size", "64", "64", "--clients", "4",
                 "--requests", "24", "--warmup", "4", "--max_batch", "1", "4",
                 "--distinct_images", "6", "--max_wait_ms", "50",
                 "--output", str(tmp_path / "load.md")])
    assert [row["max_batch"] for row in rows] == [1, 4]
    for row in rows:
        assert (row["requests"], row["errors"], row["exit"]) == (24, 0, 0), row
        assert row["RSS start MiB"] > 0 and row["p99 ms"] >= row["p50 ms"] > 0
    assert rows[0]["mean batch"] == 1 and 1 <= rows[1]["mean batch"] <= 4
    assert "| max_batch |" in (tmp_path / "load.md").read_text()
