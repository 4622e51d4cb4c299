"""benchmarks/loader.py on a tiny corpus: every table and row is there, the readers agree on the
bytes they read, and the scan rows list the tree it built (no timing is asserted)."""
from benchmarks import loader
from benchmarks.make_corpus import build_corpus
from dino_fast.data import ImageFolderDataset, ShardDataset


def test_one_run_writes_every_table(tmp_path):
    data, shards, out = tmp_path / "corpus", tmp_path / "shards", tmp_path / "loader.md"
    build_corpus(str(data), 24)
    loader.main(["--data", str(data), "--shards", str(shards), "--batch", "4", "--steps", "1",
                 "--warmup", "1", "--rounds", "1", "--scan_files", "1500", "--save", str(out)])
    text = out.read_text()
    for row in ("| torch  | folder", "| torch  | shards", "pread by index", "tarfile stream",
                "rank 0 scans", "the cached list"):
        assert row in text, row
    folder, shard_set = ImageFolderDataset(str(data)), ShardDataset(str(shards))
    size = loader.read_folder(folder)
    assert loader.read_by_index(shard_set) == loader.read_tarfile(shard_set) == size


def test_scan_rows_count_the_files():
    rows = loader.scan_rows(2500, processes=4)
    assert [row["scans per job"] for row in rows] == [4, 1, 0]
    assert all(row["files"] == 2500 for row in rows)
