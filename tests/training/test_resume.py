"""A mid-epoch checkpoint resumed with another batch size or number of processes goes on at the
exact image it reached (no image of that epoch trained twice or skipped), or is refused naming
both settings when that image is not at a step boundary of the new run."""
import pytest
import torch

from dino_fast.cli.errors import UserError
from dino_fast.data import loader as loader_module
from dino_fast.data.sampling import EpochPlan
from dino_fast.training.resume import mid_epoch_step
from tests._cli import user_error
from tests._training import TINY_RUN, load, make_images, run_in_process


def checkpoint(iteration, batch_size, world_size=None):
    ckpt = {"epoch": 3, "iteration": iteration, "args": {"batch_size_per_gpu": batch_size}}
    if world_size is not None:
        ckpt["world_size"] = world_size
    return ckpt


def test_the_step_is_the_images_done_in_this_runs_batches():
    ckpt = checkpoint(iteration=3, batch_size=4, world_size=2)  # 24 images of epoch 3
    assert mid_epoch_step("c.pth", ckpt, batch_size=4, world_size=2) == 3
    assert mid_epoch_step("c.pth", ckpt, batch_size=8, world_size=1) == 3
    assert mid_epoch_step("c.pth", ckpt, batch_size=2, world_size=4) == 3
    assert mid_epoch_step("c.pth", ckpt, batch_size=3, world_size=1) == 8
    assert mid_epoch_step("c.pth", checkpoint(0, 4, 2), batch_size=5, world_size=3) == 0
    # written before world_size was saved: the same number of processes as this run
    assert mid_epoch_step("c.pth", checkpoint(3, 4), batch_size=4, world_size=2) == 3


def test_a_position_inside_a_step_of_this_run_is_refused_naming_both_settings():
    with pytest.raises(UserError) as refused:
        mid_epoch_step("c.pth", checkpoint(iteration=3, batch_size=4, world_size=2),
                       batch_size=5, world_size=1)
    assert ("stopped after 24 images of that epoch (3 steps of --batch_size_per_gpu 4 x 2 "
            "process(es)), not a whole number of this run's steps of 5 x 1") in str(refused.value)
    assert "resume with --batch_size_per_gpu 4 on 2 process(es)" in str(refused.value)


@pytest.mark.parametrize("before,after", [((4, 2), (2, 2)), ((3, 2), (6, 1)), ((1, 4), (2, 2))])
def test_the_images_done_are_a_prefix_of_the_epoch_whatever_the_batch(before, after):
    """The rule's premise: the first k global batches are the first k * global images of the
    epoch's permutation on every world size, so the rest of the epoch misses and repeats none."""
    def epoch_images(batch_size, world_size, from_step=0, to_step=None):
        return [index for rank in range(world_size)
                for batch in EpochPlan(37, batch_size, rank, world_size, seed=5).batches(2)[
                    from_step:to_step]
                for index, _ in batch]

    done_steps = 2
    first = epoch_images(*before, to_step=done_steps)
    step = mid_epoch_step("c.pth", checkpoint(done_steps, *before), *after)
    rest = epoch_images(*after, from_step=step)
    assert len(set(first + rest)) == len(first) + len(rest)  # none twice
    assert sorted(first + rest) == sorted(epoch_images(*after))  # none skipped


def test_train_goes_on_at_the_image_reached_with_another_batch(tmp_path, monkeypatch, capsys):
    # The state after step 0 of epoch 0 with batch 4, as a stop signal there checkpoints it.
    data = make_images(tmp_path / "images", 8)
    out = tmp_path / "out"
    read = []
    real_getitem = loader_module._SeededViews.__getitem__

    def recording_getitem(self, item):
        read.append(item[0])
        return real_getitem(self, item)

    monkeypatch.setattr(loader_module._SeededViews, "__getitem__", recording_getitem)
    flags = ["--data_path", data, "--epochs", 1, "--output_dir", out]
    run_in_process(*flags, "--batch_size_per_gpu", 4, "--max_steps", 1)
    ckpt = load(out / "checkpoint.pth")
    ckpt.update(epoch=0, iteration=1)
    torch.save(ckpt, out / "checkpoint.pth")
    trained = [index for index, _ in EpochPlan(8, 4, seed=0).batches(0)[0]]  # (the loader reads
    read.clear()  # one batch ahead, so what it read is not what was trained)

    argv = [*TINY_RUN, *map(str, flags), "--batch_size_per_gpu", "3"]
    from dino_fast import train
    assert "(1 steps of --batch_size_per_gpu 4 x 1 process(es))" in user_error(
        capsys, train.main, argv)  # 4 images: not a whole number of steps of 3
    assert read == []

    run_in_process(*flags, "--batch_size_per_gpu", 2)
    assert f"resuming from {out / 'checkpoint.pth'} at epoch 0, step 2" in \
        capsys.readouterr().out
    assert len(read) == 4 and sorted(trained + read) == list(range(8))
    assert (load(out / "checkpoint.pth")["epoch"], load(out / "checkpoint.pth")["iteration"]) \
        == (1, 0)
