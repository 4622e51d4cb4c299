"""Linear evaluation (official ``eval_linear.py`` semantics): the features and the training loop
against a transcription of the official code, the schedule, resuming, and the command end to end
on a tiny synthetic labelled folder (vit_tiny at 32 px: 4 patches, so the backbone is cheap)."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dino_fast import eval_linear
from dino_fast.evaluation import linear
from dino_fast.models import build_vit
from tests._cli import user_error, user_error_and_output


def small_vit(depth=4):
    vit = build_vit("vit_tiny").eval()
    vit.blocks = vit.blocks[:depth]
    return vit


def official_features(model, inp, n, avgpool):
    """Transcribed from the official train()/validate_network() feature code."""
    intermediate_output = model.get_intermediate_layers(inp, n)
    output = torch.cat([x[:, 0] for x in intermediate_output], dim=-1)
    if avgpool:
        output = torch.cat((output.unsqueeze(-1),
                            torch.mean(intermediate_output[-1][:, 1:], dim=1).unsqueeze(-1)),
                           dim=-1)
        output = output.reshape(output.shape[0], -1)
    return output


class OfficialLinearClassifier(nn.Module):
    """Transcribed from the official LinearClassifier."""

    def __init__(self, dim, num_labels=1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        x = x.view(x.size(0), -1)
        return self.linear(x)


def official_train_steps(model, linear_classifier, optimizer, batches, n, avgpool):
    """The official train() loop body, for each (inp, target) batch."""
    linear_classifier.train()
    for inp, target in batches:
        with torch.no_grad():
            output = official_features(model, inp, n, avgpool)
        output = linear_classifier(output)
        loss = nn.CrossEntropyLoss()(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("n,avgpool", [(4, False), (1, True), (2, False)])
def test_features_match_the_official_layout(n, avgpool):
    vit = small_vit()
    images = torch.randn(3, 3, 48, 32)
    got = linear.frozen_features(vit, images, n, avgpool)
    assert got.shape == (3, linear.feature_dim(192, n, avgpool))
    torch.testing.assert_close(got, official_features(vit, images, n, avgpool), rtol=0, atol=0)


def test_official_defaults_and_refusals():
    assert linear.default_feature_args("vit_small") == (4, False)
    assert linear.default_feature_args("vit_tiny") == (4, False)
    assert linear.default_feature_args("vit_base") == (1, True)
    with pytest.raises(ValueError, match="--n_last_blocks 1"):
        linear.check_feature_args(4, True, 12)
    with pytest.raises(ValueError, match="--n_last_blocks must be in"):
        linear.check_feature_args(13, False, 12)


@pytest.mark.parametrize("n,avgpool", [(4, False), (1, True)])
def test_training_loop_matches_the_official_one(n, avgpool):
    """Same initial classifier, same two batches: the same logits after each SGD step."""
    vit = small_vit()
    batches = [(torch.randn(5, 3, 32, 32), torch.tensor([0, 3, 1, 2, 3])),
               (torch.randn(5, 3, 32, 32), torch.tensor([2, 2, 0, 1, 3]))]
    dim = linear.feature_dim(192, n, avgpool)
    torch.manual_seed(7)
    ours = linear.LinearClassifier(dim, num_labels=4)
    torch.manual_seed(7)
    theirs = OfficialLinearClassifier(dim, num_labels=4)
    assert torch.equal(ours.linear.weight, theirs.linear.weight)
    assert abs(float(ours.linear.weight.detach().std()) - 0.01) < 2e-3
    assert not ours.linear.bias.any()
    opt_ours, _ = linear.build_optimizer(ours, 0.001, 5, epochs=10)
    opt_theirs = torch.optim.SGD(theirs.parameters(), 0.001 * 5 / 256.0, momentum=0.9,
                                 weight_decay=0)
    probe = torch.randn(4, 3, 32, 32)
    for step in range(2):
        linear.train_one_epoch(lambda x: linear.frozen_features(vit, x, n, avgpool), ours,
                               opt_ours, batches[step:step + 1], "cpu")
        official_train_steps(vit, theirs, opt_theirs, batches[step:step + 1], n, avgpool)
        with torch.no_grad():
            features = official_features(vit, probe, n, avgpool)
            torch.testing.assert_close(ours(features), theirs(features), rtol=0, atol=1e-7)
    assert not torch.equal(ours.linear.weight, OfficialLinearClassifier(dim, 4).linear.weight)


def test_lr_is_scaled_and_annealed_to_zero_per_epoch():
    classifier = linear.LinearClassifier(8, 3)
    optimizer, scheduler = linear.build_optimizer(classifier, 0.001, 64, epochs=4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: changes nothing, keeps the scheduler's order check quiet
        scheduler.step()
    base = 0.001 * 64 / 256
    want = [base * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    np.testing.assert_allclose(lrs, want, rtol=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-15)
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0


def test_validate_top1_top5():
    classifier = nn.Identity()
    logits = torch.tensor([[9., 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 0, 0, 0, 0, 9.]])
    targets = torch.tensor([0, 0, 4])  # top-1 hit; outside the top 5; top-5 hit only
    loader = [(logits, targets)]
    stats = linear.validate(nn.Identity(), classifier, loader, 6, "cpu")
    assert stats["acc1"] == pytest.approx(100 / 3) and stats["acc5"] == pytest.approx(200 / 3)
    stats = linear.validate(nn.Identity(), classifier, [(logits[:, :4], targets % 4)], 4, "cpu")
    assert "acc5" not in stats  # fewer than 5 classes, as official


def make_folder(root, classes=3, per_class=4):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40, 36, 3)).astype(np.uint8)
            pixels[..., c % 3] = 255
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return str(root)


TINY = ["--arch", "vit_tiny", "--image_size", "32", "--batch_size_per_gpu", "4",
        "--num_workers", "0", "--lr", "0.1"]


def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    data = make_folder(tmp_path / "data")
    flags = [*TINY, "--data_path", data, "--val_split", "0.25", "--cached_features",
             "--epochs", "3"]
    eval_linear.main([*flags, "--output_dir", str(tmp_path / "straight")])
    real_epoch, calls = eval_linear.train_one_epoch, []

    def stopped_in_epoch_1(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(eval_linear, "train_one_epoch", stopped_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        eval_linear.main([*flags, "--output_dir", str(tmp_path / "resumed")])
    monkeypatch.undo()
    capsys.readouterr()
    eval_linear.main([*flags, "--output_dir", str(tmp_path / "resumed")])
    assert "resumed from" in capsys.readouterr().out
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth.tar", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth.tar", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 3
    assert straight["best_acc"] == resumed["best_acc"]
    for key, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][key]), key
    logged = [json.loads(line)
              for line in (tmp_path / "resumed" / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in logged] == [0, 1, 2]
    assert "--cached_features" in user_error(capsys, eval_linear.main, [  # the other mode
        *TINY, "--data_path", data, "--val_split", "0.25", "--epochs", "4",
        "--output_dir", str(tmp_path / "resumed")])


def test_command_end_to_end_on_images(tmp_path, capsys):
    """Augmented crops, the official checkpoint layout, --evaluate, one-line errors."""
    data = make_folder(tmp_path / "data", classes=5, per_class=3)
    out = tmp_path / "out"
    flags = [*TINY, "--data_path", data, "--val_split", "0.34", "--output_dir", str(out)]
    result = eval_linear.main([*flags, "--epochs", "2"])
    printed = capsys.readouterr().out
    assert "last 4 CLS tokens" in printed and "top-5" in printed
    assert "not the official" not in printed
    saved = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    assert sorted(saved) == ["backbone", "best_acc", "cached_features", "epoch", "optimizer",
                             "scheduler", "state_dict"]
    assert sorted(saved["state_dict"]) == ["module.linear.bias", "module.linear.weight"]
    assert saved["state_dict"]["module.linear.weight"].shape == (5, 4 * 192)
    evaluated = eval_linear.main([*flags, "--evaluate"])
    assert evaluated["acc1"] == pytest.approx(result["acc1"])
    for extra, cause in [(["--avgpool_patchtokens", "true"], "needs --n_last_blocks 1"),
                         (["--n_last_blocks", "1", "--epochs", "3"], "holds another classifier"),
                         (["--num_labels", "1000"], "--num_labels 1000, but"),
                         (["--evaluate", "--output_dir", str(tmp_path / "none")], "no classifier")]:
        assert cause in user_error(capsys, eval_linear.main, [*flags, *extra])


def save_backbone(path, seed):
    """A training checkpoint of a vit_tiny teacher drawn from ``seed``; returns its path."""
    torch.manual_seed(seed)
    weights = build_vit("vit_tiny").state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in weights.items()}}, path)
    return str(path)


def test_official_layout_launcher_flags_and_the_val_set_messages(tmp_path, capsys):
    """``--data_path ROOT`` with ROOT/train and ROOT/val, as official; torch.distributed.launch's
    ``--local-rank=N``; the errors name only the flags eval_linear has."""
    root = tmp_path / "root"
    make_folder(root / "train")
    make_folder(root / "val", per_class=2)
    out = str(tmp_path / "out")
    flags = [*TINY, "--epochs", "1", "--cached_features", "--output_dir", out]
    eval_linear.main([*flags, "--data_path", str(root), "--local-rank=0", "--dist_url", "env://"])
    assert "12 train / 6 val images, 3 classes" in capsys.readouterr().out
    eval_linear.main([*flags, "--data_path", str(root), "--local_rank", "0"])
    for extra, cause in [(["--data_path", str(root / "train")], "give exactly one of "
                          "--val_path and --val_split"),
                         (["--data_path", str(root), "--val_split", "0.5"], "leave out "
                          "--val_path and --val_split,")]:
        line = user_error(capsys, eval_linear.main, [*flags, *extra])
        assert cause in line and "--leave_one_out" not in line, line


def test_resume_on_another_backbone_is_refused_by_name(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    first = save_backbone(tmp_path / "first.pth", seed=1)
    other = save_backbone(tmp_path / "other.pth", seed=2)
    out = tmp_path / "out"
    flags = [*TINY, "--data_path", data, "--val_split", "0.25", "--cached_features",
             "--output_dir", str(out)]
    eval_linear.main([*flags, "--checkpoint", first, "--epochs", "1"])
    for extra in (["--epochs", "2"], ["--evaluate"]):
        line = user_error(capsys, eval_linear.main, [*flags, "--checkpoint", other, *extra])
        assert f"trained on {first} (key teacher)" in line and f"not on {other}" in line, line
    assert torch.load(out / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1  # untouched
    (tmp_path / "moved.pth").write_bytes((tmp_path / "first.pth").read_bytes())
    eval_linear.main([*flags, "--checkpoint", str(tmp_path / "moved.pth"), "--epochs", "2"])
    assert "unchecked" not in capsys.readouterr().out  # the same weights, wherever they lie


def test_official_checkpoint_without_a_backbone_record_resumes_with_a_note(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    flags = [*TINY, "--data_path", data, "--val_split", "0.25", "--cached_features",
             "--output_dir", str(tmp_path)]
    eval_linear.main([*flags, "--epochs", "1"])
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    del saved["backbone"], saved["cached_features"]  # what official eval_linear.py writes
    torch.save(saved, tmp_path / "checkpoint.pth.tar")
    capsys.readouterr()
    eval_linear.main([*flags, "--epochs", "2"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "unchecked" in line]
    assert len(notes) == 1 and "does not record its backbone" in notes[0], notes


def test_resume_with_other_epochs_follows_the_new_cosine_schedule(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    flags = [*TINY, "--data_path", data, "--val_split", "0.25", "--cached_features",
             "--output_dir", str(tmp_path)]
    eval_linear.main([*flags, "--epochs", "2"])
    capsys.readouterr()
    eval_linear.main([*flags, "--epochs", "5"])
    notes = [line for line in capsys.readouterr().out.splitlines() if "--epochs 5" in line]
    assert len(notes) == 1 and "anneals to 0 at epoch 5" in notes[0], notes
    logged = [json.loads(line)["train_lr"]
              for line in (tmp_path / "log.txt").read_text().splitlines()]
    base = 0.1 * 4 / 256
    resumed = [base * (1 + math.cos(math.pi * epoch / 5)) / 2 for epoch in (2, 3, 4)]
    np.testing.assert_allclose(logged[2:], resumed, rtol=1e-9)
    eval_linear.main([*flags, "--epochs", "3"])
    assert "nothing left to train" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--epochs", "--batch_size_per_gpu", "--val_freq"])
def test_zero_counts_are_one_line_flag_errors(tmp_path, capsys, flag):
    line, out = user_error_and_output(capsys, eval_linear.main, [
        *TINY, "--data_path", str(tmp_path), "--val_split", "0.5", flag, "0"], code=2)
    assert f"{flag} must be >= 1, got 0" in line and not out


def test_cached_features_say_they_are_not_the_official_number(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    eval_linear.main([*TINY, "--data_path", data, "--val_path", data, "--epochs", "1",
                      "--cached_features", "--output_dir", str(tmp_path / "out")])
    assert capsys.readouterr().out.count("not the official linear-evaluation number") == 2


@pytest.mark.slow  # 3 interpreter starts: about 40 s on a loaded 2-core machine
@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="no Gloo")
def test_torchrun_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """DDP averages the two shards' gradients: the same classifier as one process with their
    union as its batch (cached features, so no random crops differ)."""
    from tests._training import free_port, run
    data = make_folder(tmp_path / "data", classes=2, per_class=8)
    flags = ["--arch", "vit_tiny", "--image_size", "32", "--num_workers", "0", "--lr", "0.5",
             "--data_path", data, "--val_path", data, "--cached_features", "--epochs", "2",
             "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m",
           "dino_fast.eval_linear", *flags, "--batch_size_per_gpu", "4",
           "--output_dir", str(tmp_path / "ddp")]
    ddp = run(cmd, timeout=150)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("Top-1 test accuracy") == 1  # rank 0 alone prints and writes
    eval_linear.main([*flags, "--batch_size_per_gpu", "8", "--output_dir", str(tmp_path / "one")])
    got = torch.load(tmp_path / "ddp" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    want = torch.load(tmp_path / "one" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert not torch.equal(want["module.linear.bias"], torch.zeros(2))  # it did train


def test_trains_and_evaluates_on_a_shard_set(tmp_path, capsys):
    from dino_fast.data.shard_writer import write_shards
    shards = str(tmp_path / "shards")
    write_shards(make_folder(tmp_path / "data"), shards, 3000, say=lambda *_: None)
    eval_linear.main([*TINY, "--data_path", shards, "--val_split", "0.25", "--epochs", "1",
                      "--output_dir", str(tmp_path / "out")])
    assert "9 train / 3 val images, 3 classes" in capsys.readouterr().out
