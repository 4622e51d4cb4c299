"""One folder scan per job: the cached file list (taken while the folders are unchanged,
refreshed by any entry added, removed or renamed, at any depth; kept outside the run's output
folder) and rank 0's list shared over Gloo (the other ranks never scan; rank 0's error reaches
them instead of a hang)."""
import json
import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_fast.data import file_list, folder
from dino_fast.data.file_list import list_images
from dino_fast.data.folder import NoImagesError, find_images

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()  # the scan reads names only


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "images"
    for name in ("a/1.jpg", "a/deep/2.png", "b/3.jpg", "top.jpg"):
        touch(root / name)
    (root / "empty" / "deeper").mkdir(parents=True)  # no image yet
    return str(root)


@pytest.mark.parametrize("change, added, removed", [
    (lambda r: touch(f"{r}/empty/deeper/4.jpg"), "empty/deeper/4.jpg", None),
    (lambda r: touch(f"{r}/c/new/5.jpg"), "c/new/5.jpg", None),
    (lambda r: os.remove(f"{r}/a/deep/2.png"), None, "a/deep/2.png"),
    (lambda r: os.rename(f"{r}/b", f"{r}/b2"), "b2/3.jpg", "b/3.jpg"),
])
def test_cached_list_is_taken_until_a_folder_changes(tree, tmp_path, change, added, removed):
    cache = str(tmp_path / "out" / "file_list.json")
    files, how = list_images(tree, cache)
    assert files == find_images(tree) and how.startswith("scanned")
    assert list_images(tree, cache) == (files, list_images(tree, cache)[1])
    assert list_images(tree, cache)[1].startswith("file list from")
    change(tree)
    again, how = list_images(tree, cache)
    assert again == find_images(tree) and how.startswith("scanned")
    assert (added is None or added in again) and (removed is None or removed not in again)


def test_a_damaged_or_foreign_cache_is_scanned_over(tree, tmp_path):
    cache = tmp_path / "file_list.json"
    cache.write_text("{not json")
    assert list_images(tree, str(cache))[1].startswith("scanned")
    record = json.loads(cache.read_text())
    cache.write_text(json.dumps({**record, "root": "/elsewhere", "files": ["x.jpg"]}))
    assert list_images(tree, str(cache))[0] == find_images(tree)


def worker(rank: int, root: str, rendezvous: str, results: str):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        if rank == 1:  # only rank 0 may scan
            def no_scan(*_):
                raise AssertionError("rank 1 scanned")
            folder.scan_images = file_list.scan_images = no_scan
        try:
            outcome = list(list_images(root))
        except NoImagesError as err:
            outcome = ["error", str(err)]
        with open(f"{results}.{rank}", "w") as f:
            json.dump(outcome, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("empty", [False, True])
def test_rank_zero_scans_and_shares_its_list_or_its_error(tree, tmp_path, empty):
    root = str(tmp_path / "nothing") if empty else tree
    os.makedirs(root, exist_ok=True)
    results = str(tmp_path / "result")
    mp.spawn(worker, args=(root, str(tmp_path / "rendezvous"), results), nprocs=2)
    zero, one = (json.load(open(f"{results}.{rank}")) for rank in range(2))
    if empty:
        assert zero == one and zero[0] == "error" and "no images found" in zero[1]
    else:
        assert zero[0] == one[0] == find_images(tree)
        assert "shared with 1 other process" in one[1]


def test_the_default_cache_is_per_folder_and_outside_the_output(tree, tmp_path, monkeypatch):
    monkeypatch.setenv(file_list.CACHE_ENV, str(tmp_path / "cache"))
    assert list_images(tree)[1].startswith("scanned")
    assert list_images(tree)[1].startswith("file list from " + str(tmp_path / "cache"))
    other = tmp_path / "other"
    touch(other / "x.jpg")
    assert file_list.cache_path(str(other)) != file_list.cache_path(tree)
    assert list_images(str(other))[0] == ["x.jpg"]
