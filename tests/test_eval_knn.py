"""k-NN evaluation (official ``eval_knn.py`` semantics): the weighted vote against a NumPy
transcription of the official loop, the per-class split, and the command end to end on a tiny
synthetic labelled folder."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast import eval_knn, eval_linear
from dino_fast.evaluation import knn
from dino_fast.models import build_vit, load_pretrained
from tests._cli import user_error, user_error_and_output


def knn_numpy(train, train_labels, test, test_labels, k, T, num_classes):
    """The official loop, one test row at a time: top-k by similarity, exp(sim / T) votes,
    classes sorted by score; returns (top1 %, top5 %) with top-5 over min(5, k) classes."""
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sim = train @ x
        idx = np.argsort(-sim, kind="stable")[:k]
        scores = np.zeros(num_classes)
        for i in idx:
            scores[train_labels[i]] += np.exp(sim[i] / T)
        ranked = np.argsort(-scores, kind="stable")
        top1 += ranked[0] == y
        top5 += y in ranked[:min(5, k)]
    return 100.0 * top1 / len(test), 100.0 * top5 / len(test)


@pytest.mark.parametrize("k,num_classes,n_train,n_test", [(1, 3, 7, 5), (10, 6, 37, 19),
                                                          (20, 7, 50, 33)])
def test_knn_matches_numpy(k, num_classes, n_train, n_test):
    train = F.normalize(torch.randn(n_train, 16, dtype=torch.float64), dim=1)
    test = F.normalize(torch.randn(n_test, 16, dtype=torch.float64), dim=1)
    train_labels = torch.randint(0, num_classes, (n_train,))
    test_labels = torch.randint(0, num_classes, (n_test,))
    scores = knn.knn_classify(train, train_labels, test, k, 0.07, num_classes, chunk=4)
    got = knn.topk_accuracy(scores, test_labels, ks=(1, min(5, k)))
    want = knn_numpy(train.numpy(), train_labels.numpy(), test.numpy(), test_labels.numpy(), k,
                     0.07, num_classes)
    assert got == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("k,n", [(3, 9), (20, 37), (200, 23)])
def test_leave_one_out_matches_numpy_without_the_query(k, n):
    feats = F.normalize(torch.randn(n, 16, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 6, (n,))
    scores = knn.knn_classify(feats, labels, feats, k, 0.07, 6, chunk=4, leave_one_out=True)
    x, y = feats.numpy(), labels.numpy()
    for i in range(n):  # row i against the others only, k capped at n - 1
        rest = np.arange(n) != i
        want = knn_numpy(x[rest], y[rest], x[i:i + 1], y[i:i + 1], min(k, n - 1), 0.07, 6)
        got = knn.topk_accuracy(scores[i:i + 1], labels[i:i + 1], ks=(1, min(5, k)))
        assert got == pytest.approx(want, abs=1e-9)


def test_knn_scores_by_hand():
    # Train points at angles 0, 90 and 180 degrees; test point at 0: sims 1, 0, -1.
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn.knn_classify(train, labels, test, k=2, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[np.exp(2.0), np.exp(0.0)]],
                                                    dtype=torch.float32))
    # k above the train-set size is capped: all three vote.
    scores = knn.knn_classify(train, labels, test, k=200, temperature=0.5)
    torch.testing.assert_close(scores, torch.tensor([[np.exp(2.0), 1 + np.exp(-2.0)]],
                                                    dtype=torch.float32))


def test_split_is_per_class_and_deterministic():
    samples = [(f"c{c}/{i}.png", c) for c in range(3) for i in range(10 if c else 1)]
    train, val = knn.split_samples(samples, 0.2, seed=3)
    assert sorted(train + val) == sorted(samples)
    assert [sum(1 for _, y in val if y == c) for c in range(3)] == [1, 2, 2]
    assert knn.split_samples(samples, 0.2, seed=3) == (train, val)
    with pytest.raises(ValueError, match="val_split"):
        knn.split_samples(samples, 1.5)


def make_folder(root, counts, size=40):
    """Class folders of images of one noisy base colour per class."""
    gen = np.random.default_rng(0)
    for c, n in enumerate(counts):
        (root / f"class{c}").mkdir(parents=True)
        base = gen.integers(0, 256, 3)
        for i in range(n):
            pixels = np.clip(base + gen.normal(0, 20, (size, size + 7, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class{c}" / f"{i}.png")


def test_command_matches_manual_features(tmp_path, capsys):
    make_folder(tmp_path / "train", [4, 3, 5, 2, 3, 4])
    make_folder(tmp_path / "val", [2, 1, 2, 1, 1, 2])
    torch.manual_seed(1)
    model = build_vit("vit_tiny", 16)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in model.state_dict().items()},
                "student": {}}, ckpt)
    flags = ["--checkpoint", str(ckpt), "--data_path", str(tmp_path / "train"), "--val_path",
             str(tmp_path / "val"), "--image_size", "32", "--nb_knn", "3", "200", "--batch_size",
             "4", "--num_workers", "0", "--device", "cpu"]
    results = eval_knn.main(flags)  # the arch comes from the checkpoint
    assert "holds a vit_tiny/16 ViT" in user_error(capsys, eval_knn.main,
                                                   flags + ["--arch", "vit_small"])
    # Recompute by hand: same eval transform, the model's CLS output, NumPy k-NN.
    fresh = build_vit("vit_tiny", 16)
    load_pretrained(fresh, str(ckpt))
    transform = knn.eval_transform(32)

    def feats(folder):
        ds = knn.labelled_dataset(str(folder), 32)
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in ds.samples])
        with torch.no_grad():
            f = F.normalize(fresh.eval()(x), dim=1).double().numpy()
        return f, np.array([y for _, y in ds.samples])

    (tr, ytr), (te, yte) = feats(tmp_path / "train"), feats(tmp_path / "val")
    for k in (3, 200):
        top1, top5 = knn_numpy(tr, ytr, te, yte, min(k, len(tr)), 0.07, 6)
        assert results[k]["top1"] == pytest.approx(top1)
        assert results[k]["top5"] == pytest.approx(top5)


def test_top5_only_with_five_classes_and_split(tmp_path):
    make_folder(tmp_path / "data", [4, 4, 4])
    results = eval_knn.main(["--arch", "vit_tiny", "--data_path", str(tmp_path / "data"),
                             "--val_split", "0.25", "--image_size", "32", "--nb_knn", "2",
                             "--num_workers", "0", "--device", "cpu"])
    assert results[2]["top5"] is None and 0 <= results[2]["top1"] <= 100


def test_leave_one_out_command(tmp_path, capsys):
    make_folder(tmp_path / "data", [4, 3, 5])
    flags = ["--arch", "vit_tiny", "--data_path", str(tmp_path / "data"), "--image_size", "32",
             "--nb_knn", "3", "--num_workers", "0", "--device", "cpu", "--seed", "2"]
    results = eval_knn.main(flags + ["--leave_one_out"])
    torch.manual_seed(2)  # the random init that main builds for --seed 2
    model = build_vit("vit_tiny", 16)
    feats, labels = knn.extract_features(
        model, knn.labelled_dataset(str(tmp_path / "data"), 32), num_workers=0)
    x, y = feats.double().numpy(), labels.numpy()
    hits = [knn_numpy(np.delete(x, i, 0), np.delete(y, i), x[i:i + 1], y[i:i + 1], 3, 0.07, 3)[0]
            for i in range(len(y))]
    assert results[3]["top1"] == pytest.approx(np.mean(hits))
    for extra in (["--leave_one_out", "--val_split", "0.5"], []):
        assert "exactly one of" in user_error(capsys, eval_knn.main, flags + extra)


def test_unlabelled_folder_is_an_error(tmp_path, capsys):
    make_folder(tmp_path / "data", [2])
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "loose.png")
    assert "class sub-folder" in user_error(capsys, eval_knn.main, [
        "--arch", "vit_tiny", "--data_path", str(tmp_path / "data"), "--val_split", "0.5",
        "--device", "cpu"])


def test_official_flags_layout_and_saved_features(tmp_path, capsys, monkeypatch):
    """eval_knn.py's flag names, ROOT/train + ROOT/val, --dump_features/--load_features."""
    make_folder(tmp_path / "root" / "train", [3, 3, 2])
    make_folder(tmp_path / "root" / "val", [1, 2, 1])
    torch.manual_seed(3)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in build_vit("vit_tiny").state_dict()
                            .items()}}, ckpt)
    workers = []
    extract = eval_knn.dataset_features

    def spy(model, train_set, val_set, batch_size, num_workers, device):  # records, runs inline
        workers.append(num_workers)
        return extract(model, train_set, val_set, batch_size, 0, device)

    monkeypatch.setattr(eval_knn, "dataset_features", spy)
    monkeypatch.setattr(eval_knn.os, "cpu_count", lambda: 3)
    common = ["--image_size", "32", "--nb_knn", "2", "5", "--device", "cpu"]
    root = tmp_path / "root"
    ours = eval_knn.main(["--checkpoint", str(ckpt), "--data_path", str(root / "train"),
                          "--val_path", str(root / "val"), "--num_workers", "2", *common])
    official = eval_knn.main([
        "--pretrained_weights", str(ckpt), "--checkpoint_key", "teacher", "--arch", "deit_tiny",
        "--patch_size", "16", "--data_path", str(tmp_path / "root"), "--batch_size_per_gpu", "4",
        "--temperature", "0.07", "--num_workers", "64", "--use_cuda", "false",
        "--dump_features", str(tmp_path / "features"), *common])
    assert official == ours and workers == [2, 3]  # 64 workers capped at the 3 CPUs
    assert sorted(os.listdir(tmp_path / "features")) == sorted(knn.FEATURE_FILES.values())
    loaded = eval_knn.main(["--load_features", str(tmp_path / "features"), *common])
    assert loaded == ours and workers == [2, 3]  # no model, no images
    # The official layout is used as it is, and one class is no k-NN score.
    line = user_error(capsys, eval_knn.main, ["--data_path", str(tmp_path / "root"),
                                              "--val_split", "0.5", *common])
    assert "official layout" in line
    make_folder(tmp_path / "single" / "train", [3])
    make_folder(tmp_path / "single" / "val", [2])
    line = user_error(capsys, eval_knn.main, ["--data_path", str(tmp_path / "single"), *common])
    assert "at least two classes" in line


def bad_layout(root, case: str) -> str:
    """A ``--data_path`` of the official layout that is wrong in the way ``case`` names."""
    if case == "missing folder":
        return str(root / "nowhere")
    make_folder(root / "train", [2, 2])
    make_folder(root / "val", [1, 1])
    if case == "empty class folder":
        (root / "train" / "class2").mkdir()
        (root / "val" / "class2").mkdir()
    else:  # a val class unknown to train
        (root / "val" / "class1").rename(root / "val" / "zebra")
    return str(root)


@pytest.mark.parametrize("command", [eval_knn, eval_linear], ids=["knn", "linear"])
@pytest.mark.parametrize("case,cause", [
    ("missing folder", "does not exist"),
    ("empty class folder", "class folder(s) ['class2'] hold no image"),
    ("val class unknown to train", "only in val: ['zebra'], only in train: ['class1']")])
def test_bad_data_is_one_line_naming_the_folder(tmp_path, capsys, command, case, cause):
    root = bad_layout(tmp_path / "root", case)
    line, out = user_error_and_output(capsys, command.main, [
        "--arch", "vit_tiny", "--image_size", "32", "--num_workers", "0", "--device", "cpu",
        "--data_path", root, *(["--output_dir", str(tmp_path)] if command is eval_linear else [])])
    assert cause in line and root in line, line
    assert "linear evaluation of" not in out  # refused before a model is loaded


@pytest.mark.parametrize("flag,value", [("--nb_knn", "0"), ("--batch_size_per_gpu", "0"),
                                        ("--temperature", "0")])
def test_flags_out_of_range_are_one_line(tmp_path, capsys, flag, value):
    line = user_error(capsys, eval_knn.main, ["--data_path", str(tmp_path), flag, value], code=2)
    assert flag in line and f"got {value}" in line, line


def test_launcher_flags_and_one_process_for_the_evaluation(tmp_path, monkeypatch):
    """torch.distributed.launch passes --local-rank=N: accepted. Rank 0 evaluates alone; the
    other ranks return at once, so --dump_features has one writer."""
    make_folder(tmp_path / "root" / "train", [2, 2])
    make_folder(tmp_path / "root" / "val", [1, 1])
    flags = ["--arch", "vit_tiny", "--data_path", str(tmp_path / "root"), "--image_size", "32",
             "--nb_knn", "2", "--num_workers", "0", "--device", "cpu", "--dist_url", "env://",
             "--dump_features", str(tmp_path / "features")]
    monkeypatch.setenv("RANK", "1")
    assert eval_knn.main([*flags, "--local-rank=1"]) == {}
    assert not (tmp_path / "features").exists()
    monkeypatch.setenv("RANK", "0")
    assert 2 in eval_knn.main([*flags, "--local_rank", "0"])
    assert (tmp_path / "features" / "trainfeat.pth").is_file()


def test_shard_sets_give_the_folders_results(tmp_path):
    from dino_fast.data.shard_writer import write_shards
    for split, counts in (("train", [4, 3, 5]), ("val", [2, 1, 2])):
        make_folder(tmp_path / "images" / split, counts)
        write_shards(str(tmp_path / "images" / split), str(tmp_path / "shards" / split), 2000,
                     say=lambda *_: None)
    flags = ["--arch", "vit_tiny", "--image_size", "32", "--nb_knn", "1", "3", "--batch_size",
             "4", "--num_workers", "0", "--device", "cpu", "--seed", "3"]
    torch.manual_seed(0)
    by_folder = eval_knn.main([*flags, "--data_path", str(tmp_path / "images")])
    torch.manual_seed(0)
    by_shards = eval_knn.main([*flags, "--data_path", str(tmp_path / "shards")])  # train/, val/
    torch.manual_seed(0)
    named = eval_knn.main([*flags, "--data_path", str(tmp_path / "shards" / "train"),
                           "--val_path", str(tmp_path / "shards" / "val" / "dino_shards.json")])
    assert by_shards == by_folder == named
