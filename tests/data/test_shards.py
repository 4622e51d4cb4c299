"""WebDataset shard sets: writing (DALI's own index tool agrees, bytes unchanged, deterministic,
resumable, refusals), reading (the same images and labels as the folder), the epoch plan (each
sample once, equal ranks, exact mid-epoch resume), damaged sets, and training on shards."""
import hashlib
import json
import os
import signal
import subprocess
import tarfile

import pytest
import torch

from dino_fast.cli.errors import UserError
from dino_fast.data import (
    BadImageError,
    ImageFolderDataset,
    ShardDataset,
    build_loader,
    shard_writer,
)
from dino_fast.data.sampling import ShardEpochPlan
from dino_fast.data.shard_writer import verify_shards, write_shards
from dino_fast.data.shards import MANIFEST, ShardSetError
from dino_fast.shards import main as shards_main
from tests.data.test_data import SMALL, make_folder


def labelled_folder(root, per_class=5, classes="abc"):
    """``per_class`` photos per class folder, in several formats; returns the folder."""
    exts = [".jpg", ".png", ".JPEG", ".webp", ".bmp"]
    return make_folder(root, {f"{c}/{i}{exts[i % len(exts)]}": "RGB"
                              for c in classes for i in range(per_class)})


def shard(folder, out, shard_size=10000, seed=0) -> str:
    write_shards(folder, str(out), shard_size, seed, say=lambda *_: None)
    return str(out)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(image folder, its shard set) of 15 images in 3 classes, several shards."""
    base = tmp_path_factory.mktemp("sharded")
    folder = labelled_folder(base / "images")
    return folder, shard(folder, base / "shards")


# ---------------------------------------------------------------- writing
def test_index_is_dalis_own_and_members_hold_the_bytes_unchanged(sharded, tmp_path):
    folder, shards = sharded
    manifest = json.load(open(os.path.join(shards, MANIFEST)))
    assert len(manifest["shards"]) > 2 and manifest["classes"] == ["a", "b", "c"]
    source = {hashlib.sha256(open(path, "rb").read()).hexdigest(): label
              for path, label in ImageFolderDataset(folder).samples}
    found = {}
    for entry in manifest["shards"]:
        tar_path = os.path.join(shards, entry["name"])
        subprocess.run(["wds2idx", tar_path, str(tmp_path / "dali.idx")], check=True,
                       capture_output=True)
        assert (tmp_path / "dali.idx").read_text() == open(
            os.path.join(shards, entry["index"])).read()
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        images = {n: d for n, d in members.items() if not n.endswith(".cls")}
        assert len(images) == entry["samples"] and len(members) == 2 * entry["samples"]
        for name, data in images.items():
            key, ext = name.split(".")
            assert ext == ext.lower()
            found[hashlib.sha256(data).hexdigest()] = int(members[f"{key}.cls"])
    assert found == source  # every image once, its bytes as they were, its class


def test_shards_are_deterministic_and_mix_the_classes(sharded, tmp_path):
    folder, shards = sharded
    again = json.load(open(os.path.join(shard(folder, tmp_path / "again"), MANIFEST)))
    first = json.load(open(os.path.join(shards, MANIFEST)))
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    labels = sum((s["labels"] for s in first["shards"]), [])
    assert labels != sorted(labels)  # written in a seeded random order
    other = json.load(open(os.path.join(shard(folder, tmp_path / "seed1", seed=1), MANIFEST)))
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in first["shards"]]


def test_an_interrupted_write_resumes_to_the_same_shards(sharded, tmp_path, monkeypatch):
    folder, shards = sharded
    write = shard_writer.write_shard
    calls = []

    def full_disk_at_the_third(plan, number, tar, index):
        calls.append(number)
        if calls == [0, 1, 2]:
            open(f"{tar}.partial", "wb").write(b"torn")
            raise OSError(28, "No space left on device", f"{tar}.partial")
        return write(plan, number, tar, index)
    monkeypatch.setattr(shard_writer, "write_shard", full_disk_at_the_third)
    with pytest.raises(UserError, match="No space left on device.*2 shards written are kept"):
        shard(folder, tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists()
    calls.clear()
    resumed = json.load(open(os.path.join(shard(folder, tmp_path / "out"), MANIFEST)))
    assert calls[:2] == [2, 3]  # shards 0 and 1 were kept
    assert resumed == json.load(open(os.path.join(shards, MANIFEST)))
    assert not (tmp_path / "out" / shard_writer.PROGRESS).exists()


def test_refusals_name_the_cause(sharded, tmp_path):
    folder, shards = sharded
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no shard set"):
        shard(folder, tmp_path / "busy")
    with pytest.raises(UserError, match="another folder or other flags"):
        shard(folder, shards, shard_size=999)
    shard(folder, shards)  # the same again: nothing to do


def test_command_flags_and_verify(sharded, tmp_path, capsys):
    _, shards = sharded
    with pytest.raises(SystemExit):
        shards_main(["--data_path", "x"])
    assert "give --data_path and --output_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        shards_main(["--data_path", "x", "--output_dir", "y", "--shard_size", "lots"])
    assert shards_main(["--verify", shards]) == 0
    assert "every checksum matches" in capsys.readouterr().out


# ---------------------------------------------------------------- reading
def test_the_shard_set_reads_as_the_folder(sharded):
    folder, shards = sharded
    by_folder, by_shards = ImageFolderDataset(folder), ShardDataset(shards)
    assert by_shards.classes == by_folder.classes and len(by_shards) == len(by_folder)

    def content(dataset):
        return sorted((label, dataset.load(i)[0].tobytes()) for i, (_, label) in
                      enumerate(dataset.samples))
    assert content(by_shards) == content(by_folder)


def damaged_copy(shards, tmp_path) -> str:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(shards):
        (copy / name).write_bytes(open(os.path.join(shards, name), "rb").read())
    return str(copy)


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.truncate(f"{d}/shard-000001.tar", 1000), "truncated"),
    (lambda d: os.remove(f"{d}/shard-000000.idx"), "missing"),
    (lambda d: open(f"{d}/shard-000002.idx", "w").write("v1.2 1\npng 512 9 k.png\n"),
     "stale index"),
    (lambda d: open(f"{d}/{MANIFEST}", "w").write("{"), "cannot read the shard manifest"),
])
def test_a_damaged_set_is_one_clear_error(sharded, tmp_path, damage, message):
    copy = damaged_copy(sharded[1], tmp_path)
    damage(copy)
    with pytest.raises(ShardSetError, match=message):
        build_loader(kind="torch", data_path=copy, batch_size=2, **SMALL)


def test_a_damaged_sample_is_named_or_skipped_and_verify_sees_it(sharded, tmp_path):
    copy = damaged_copy(sharded[1], tmp_path)
    dataset = ShardDataset(copy)
    number, offset, size, name = dataset.samples[0][0]
    with open(dataset.shards[number], "r+b") as f:  # same size: only the checksum tells
        f.seek(offset)
        f.write(b"\0" * size)
    with pytest.raises(BadImageError, match=f"shard-00000{number}.tar:{name}"):
        dataset.load(0)
    skipping = ShardDataset(copy, skip_bad_images=True)
    assert skipping.load(0)[1] == skipping.samples[1][1]
    with pytest.raises(ShardSetError, match=f"shard-00000{number}.tar' does not match"):
        verify_shards(copy, say=lambda *_: None)


# ---------------------------------------------------------------- the epoch plan
@pytest.mark.parametrize("sizes, batch, world", [([5, 7, 3, 9, 4], 2, 3), ([1, 40], 3, 2),
                                                 ([6] * 4, 6, 4), ([13], 1, 1)])
def test_each_sample_once_equal_ranks_stretches_of_shards(sizes, batch, world):
    starts = torch.cumsum(torch.tensor(sizes), 0).tolist()
    epochs = []
    for epoch in range(3):
        seen = []
        for rank in range(world):
            plan = ShardEpochPlan(sizes, batch, rank, world, seed=5)
            mine = plan.rank_indices(epoch).tolist()
            assert len(mine) == plan.steps * batch == sum(sizes) // (batch * world) * batch
            shard_runs = [sum(i >= s for s in starts) for i in mine]
            runs = [k for j, k in enumerate(shard_runs) if j == 0 or k != shard_runs[j - 1]]
            assert len(runs) == len(set(runs))  # each shard read in one stretch
            seen += mine
        assert len(seen) == len(set(seen))  # no sample twice in an epoch
        assert sum(sizes) - len(seen) < batch * world  # drop-last only
        epochs.append(seen)
    again = [ShardEpochPlan(sizes, batch, r, world, seed=5).rank_indices(1).tolist()
             for r in range(world)]
    assert sum(again, []) == epochs[1]
    assert len(sizes) == 1 and sum(sizes) < 4 or epochs[0] != epochs[1]


def test_loader_over_shards_resumes_mid_epoch_at_the_same_sample(sharded):
    _, shards = sharded
    loaders = [build_loader(kind="torch", data_path=shards, batch_size=2, num_workers=w,
                            local_crops_number=1, seed=3, **SMALL) for w in (0, 2)]
    loaders[0].set_epoch(2)
    whole = list(loaders[0])
    loaders[1].set_epoch(2, first_step=3)
    resumed = list(loaders[1])
    assert len(resumed) == len(whole) - 3
    for (c1, y1), (c2, y2) in zip(whole[3:], resumed):
        assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(c1, c2))


def test_a_run_stopped_and_resumed_sees_the_samples_of_one_that_was_not(sharded, tmp_path,
                                                                         monkeypatch):
    from dino_fast.train import build_parser, train
    _, shards = sharded
    seen, stop_after = [], [None]
    load = ShardDataset.load

    def recording_load(self, index):
        seen.append(index)
        if len(seen) == stop_after[0]:
            os.kill(os.getpid(), signal.SIGTERM)  # the step finishes, is checkpointed, stops
        return load(self, index)
    monkeypatch.setattr(ShardDataset, "load", recording_load)
    flags = ["--arch", "vit_tiny", "--out_dim", "64", "--batch_size_per_gpu", "2",
             "--local_crops_number", "1", "--num_workers", "0", "--epochs", "2",
             "--global_crops_size", "32", "--local_crops_size", "16", "--warmup_epochs", "0",
             "--loader", "torch", "--device", "cpu", "--no-curves", "--data_path", shards]
    train(build_parser().parse_args(flags + ["--output_dir", str(tmp_path / "whole")]))
    uninterrupted = list(seen)
    seen.clear()
    stop_after[0] = 9  # during step 4 of epoch 0 (7 steps of 2)
    for _ in range(2):
        train(build_parser().parse_args(flags + ["--output_dir", str(tmp_path / "stopped")]))
    assert seen == uninterrupted and len(seen) == 2 * 7 * 2


# ---------------------------------------------------------------- DALI's WebDataset reader
def test_dali_reads_the_planned_samples_and_matches_the_torch_loader(sharded, tmp_path):
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import pipeline_def

    from dino_fast.data.dali_pipeline import read_encoded
    dataset = ShardDataset(sharded[1])
    order = [7, 3, 12, 0, 14, 5, 9, 1]  # across several shards, out of order
    source = dataset.dali_source(order, str(tmp_path), "t")

    @pipeline_def(batch_size=len(order), num_threads=1, device_id=None)
    def read():
        return read_encoded(source)
    pipe = read()
    pipe.build()
    (encoded,) = pipe.run()
    got = [bytes(encoded.at(k)) for k in range(len(order))]

    assert got == [dataset.read_bytes(dataset.samples[i][0]) for i in order]
    for rank in range(2):
        labels = []
        for kind in ("torch", "dali"):
            loader = build_loader(kind=kind, data_path=sharded[1], batch_size=2, rank=rank,
                                  world_size=2, num_workers=1, local_crops_number=0, **SMALL)
            loader.set_epoch(1)
            labels.append([y.tolist() for _, y in loader])
        assert labels[0] == labels[1] and len(labels[0]) == 3


def test_dali_names_or_skips_a_damaged_sample(sharded, tmp_path):
    pytest.importorskip("nvidia.dali")
    copy = damaged_copy(sharded[1], tmp_path)
    dataset = ShardDataset(copy)
    number, offset, size, name = dataset.samples[4][0]
    with open(dataset.shards[number], "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    kwargs = dict(kind="dali", data_path=copy, batch_size=5, num_workers=1,
                  local_crops_number=0, **SMALL)
    with pytest.raises(BadImageError, match=name):
        for epoch in range(3):  # the damaged sample is read in every epoch
            strict = build_loader(**kwargs)
            strict.set_epoch(epoch)
            list(strict)
    skipping = build_loader(skip_bad_images=True, **kwargs)
    skipping.set_epoch(0)
    assert len(list(skipping)) == 3

