"""Every numeric flag of every command is checked against its range before anything starts, and
the error names the flag (one line, exit status 2, as argparse's own errors). One table of bad
values per command; the defaults must pass."""
import math
import re

import pytest

from dino_fast import eval_knn, train, visualize
from dino_fast.cli.errors import FlagError
from dino_fast.cli.flags import EVAL_KNN, EVAL_LINEAR, EXPORT, MAPS, TRAIN, Range, check_train_args
from tests._cli import user_error
from tests._training import TINY_RUN

# (bad flags, the flag the error must name)
TRAIN_CASES = [
    (["--momentum_teacher", "1.5"], "--momentum_teacher"),
    (["--momentum_teacher", "-0.1"], "--momentum_teacher"),
    (["--out_dim", "0"], "--out_dim"),
    (["--teacher_temp", "0"], "--teacher_temp"),
    (["--warmup_teacher_temp", "-0.04"], "--warmup_teacher_temp"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--max_steps", "0"], "--max_steps"),  # not "no limit"
    (["--data_path", ""], "--data_path"),  # an unset shell variable, not "the demo photos"
    (["--output_dir", " "], "--output_dir"),
    (["--epochs", "0"], "--epochs"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--weight_decay_end", "nan"], "--weight_decay_end"),
    (["--clip_grad", "-1"], "--clip_grad"),
    (["--freeze_last_layer", "-1"], "--freeze_last_layer"),
    (["--warmup_epochs", "-1"], "--warmup_epochs"),
    (["--min_lr=-1e-6"], "--min_lr"),
    (["--drop_path_rate", "1"], "--drop_path_rate"),
    (["--global_crops_scale", "0", "1"], "--global_crops_scale"),
    (["--local_crops_scale", "0.4", "0.05"], "--local_crops_scale"),  # MIN > MAX
    (["--local_crops_number", "-1"], "--local_crops_number"),
    (["--saveckp_freq", "-1"], "--saveckp_freq"),
    (["--seed", "-1"], "--seed"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--patch_size", "0"], "--patch_size"),
    (["--global_crops_size", "0"], "--global_crops_size"),
    (["--local_crops_size", "24"], "--local_crops_size"),  # not a multiple of 16
    (["--epochs", "2", "--warmup_teacher_temp_epochs", "3"], "--warmup_teacher_temp_epochs"),
    (["--warmup_teacher_temp_epochs", "-1"], "--warmup_teacher_temp_epochs"),
]


@pytest.mark.parametrize("flags,name", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_flag_out_of_range_is_named_before_anything_starts(tmp_path, flags, name):
    out = tmp_path / "out"
    args = train.build_parser().parse_args([*TINY_RUN, "--output_dir", str(out), *flags])
    with pytest.raises(FlagError, match=re.escape(name)):
        train.train(args)
    assert not out.exists()  # nothing started


EVAL_KNN_CASES = [
    (["--nb_knn", "10", "0"], "--nb_knn"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--val_split", "1"], "--val_split"),
    (["--image_size", "0"], "--image_size"),
    (["--batch_size_per_gpu", "0"], "--batch_size_per_gpu"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--patch_size", "0"], "--patch_size"),
    (["--seed", "-3"], "--seed"),
    (["--pretrained_weights", ""], "--pretrained_weights"),
    (["--val_path", ""], "--val_path"),
    (["--dump_features", ""], "--dump_features"),
    (["--arch", "vit_tiny", "--image_size", "40"], "--image_size"),  # not a multiple of 16
]


@pytest.mark.parametrize("flags,name", EVAL_KNN_CASES,
                         ids=[" ".join(c[0]) for c in EVAL_KNN_CASES])
def test_eval_knn_flag_out_of_range_is_named(tmp_path, capsys, flags, name):
    argv = ["--data_path", str(tmp_path), "--val_split", "0.5", *flags]
    assert name in user_error(capsys, eval_knn.main, argv, code=2)


EVAL_LINEAR_CASES = [
    (["--epochs", "0"], "--epochs"),
    (["--lr", "nan"], "--lr"),
    (["--n_last_blocks", "0"], "--n_last_blocks"),
    (["--val_freq", "0"], "--val_freq"),
    (["--num_labels", "0"], "--num_labels"),
    (["--output_dir", ""], "--output_dir"),
]


@pytest.mark.parametrize("flags,name", EVAL_LINEAR_CASES,
                         ids=[" ".join(c[0]) for c in EVAL_LINEAR_CASES])
def test_eval_linear_flag_out_of_range_is_named(tmp_path, capsys, flags, name):
    from dino_fast import eval_linear
    argv = ["--data_path", str(tmp_path), "--val_split", "0.5", "--output_dir",
            str(tmp_path / "out"), *flags]
    assert name in user_error(capsys, eval_linear.main, argv, code=2)
    assert not (tmp_path / "out").exists()  # refused before anything is written


MAP_CASES = [
    (["--threshold", "0"], "--threshold"),
    (["--threshold", "1.5"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--image_size", "0", "480"], "--image_size"),
    (["--image_size", "1", "2", "3"], "--image_size"),
    (["--patch_size", "0"], "--patch_size"),
]
VISUALIZE_CASES = MAP_CASES + [(["--image_path", ""], "--image_path"),
                               (["--pretrained_weights", " "], "--pretrained_weights")]


@pytest.mark.parametrize("flags,name", VISUALIZE_CASES,
                         ids=[" ".join(c[0]) for c in VISUALIZE_CASES])
def test_visualize_flag_out_of_range_is_named(tmp_path, capsys, flags, name):
    argv = ["--image_path", str(tmp_path / "x.png"), *flags]
    assert name in user_error(capsys, visualize.main, argv, code=2)


INFER_CASES = MAP_CASES + [(["--threads", "0"], "--threads"), (["--images", ""], "--images")]


@pytest.mark.parametrize("flags,name", INFER_CASES, ids=[" ".join(c[0]) for c in INFER_CASES])
def test_infer_flag_out_of_range_is_named(tmp_path, capsys, flags, name):
    pytest.importorskip("onnxruntime")
    from dino_fast.infer import main
    argv = ["--model", str(tmp_path / "m.onnx"), "--images", str(tmp_path), *flags]
    assert name in user_error(capsys, main, argv, code=2)


EXPORT_CASES = [(["--opset", "17"], "--opset"), (["--image_size", "0", "224"], "--image_size"),
                (["--patch_size", "0"], "--patch_size"), (["--output", ""], "--output"),
                (["--checkpoint", ""], "--checkpoint")]


@pytest.mark.parametrize("flags,name", EXPORT_CASES, ids=[" ".join(c[0]) for c in EXPORT_CASES])
def test_export_flag_out_of_range_is_named(tmp_path, capsys, flags, name):
    pytest.importorskip("onnxruntime")
    from dino_fast.export.command import main
    argv = ["--output", str(tmp_path / "m.onnx"), *flags]
    assert name in user_error(capsys, main, argv, code=2)


def test_defaults_and_official_values_pass():
    check_train_args(train.build_parser().parse_args([]))
    check_train_args(train.build_parser().parse_args(
        ["--momentum_teacher", "1", "--local_crops_number", "0", "--clip_grad", "0",
         "--patch_size", "8", "--drop_path_rate", "0", "--weight_decay", "0"]))


def test_every_range_rejects_nan_and_infinities():
    for table in (TRAIN, EVAL_KNN, EVAL_LINEAR, MAPS, EXPORT):
        for name, valid in table.items():
            assert not any(v in valid for v in (math.nan, math.inf, -math.inf)), name


def test_range_bounds():
    assert 0 in Range(0) and 0 not in Range(0, low_open=True)
    assert 1 in Range(0, 1) and 1 not in Range(0, 1, high_open=True)
    assert str(Range(0, 1, low_open=True)) == "in (0, 1]" and str(Range(1)) == ">= 1"


def test_deit_names_map_to_vit():
    """As official main_dino.py: "we changed the name DeiT-S for ViT-S"."""
    for official, ours in (("deit_tiny", "vit_tiny"), ("deit_small", "vit_small"),
                           ("vit_base", "vit_base")):
        assert train.build_parser().parse_args(["--arch", official]).arch == ours
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--arch", "resnet50"])
