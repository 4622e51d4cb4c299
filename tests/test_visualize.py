"""Attention-map logic against official visualize_attention.py semantics, and the command."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_fast.data import BadImageError
from dino_fast.evaluation.attention_maps import (
    heat_colormap,
    load_image,
    resized_shape,
    threshold_masks,
    upsample_nearest,
)
from dino_fast.models import build_vit
from dino_fast.visualize import last_cls_attention
from dino_fast.visualize import main as visualize_main


def official_threshold(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """The official per-head loop of visualize_attention.py, on ``[heads, N]``."""
    val, idx = torch.sort(attentions)
    val /= torch.sum(val, dim=1, keepdim=True)
    th_attn = torch.cumsum(val, dim=1) > (1 - threshold)
    idx2 = torch.argsort(idx)
    return torch.stack([th_attn[h][idx2[h]] for h in range(attentions.shape[0])])


def test_threshold_hand_checked():
    maps = np.array([[0.1, 0.4, 0.2, 0.3]])
    # ascending 0.1 0.2 0.3 0.4 -> cumsum 0.1 0.3 0.6 1.0; keep > 0.4 -> 0.3, 0.4
    np.testing.assert_array_equal(threshold_masks(maps, 0.6), [[False, True, False, True]])
    # keep > 0.25 -> 0.2, 0.3, 0.4
    np.testing.assert_array_equal(threshold_masks(maps, 0.75), [[False, True, True, True]])
    np.testing.assert_array_equal(threshold_masks(maps, 1.0), [[True, True, True, True]])
    with pytest.raises(ValueError, match="threshold"):
        threshold_masks(maps, 0.0)


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_threshold_matches_official(threshold):
    maps = torch.rand(6, 37, dtype=torch.float64).softmax(-1)  # distinct values: no tie order
    expected = official_threshold(maps.clone(), threshold).numpy()
    np.testing.assert_array_equal(threshold_masks(maps.numpy(), threshold), expected)


def test_upsample_nearest_matches_interpolate():
    grid = torch.rand(3, 5, 7)
    ref = F.interpolate(grid[None], scale_factor=8, mode="nearest")[0]
    np.testing.assert_array_equal(upsample_nearest(grid.numpy(), 8), ref.numpy())


def test_resized_shape():
    assert resized_shape(300, 451, 480, 16) == (480, 720)  # shorter side 480, aspect kept
    assert resized_shape(300, 451, (224, 100), 16) == (224, 96)  # exact, rounded down
    assert resized_shape(300, 451, None, 16) == (288, 448)
    assert resized_shape(5, 5, None, 16) == (16, 16)  # at least one patch


def test_colormap_is_monotone_in_brightness():
    colours = heat_colormap(np.linspace(0, 1, 50)).astype(int).sum(-1)
    assert np.all(np.diff(colours) >= 0) and colours[0] < 10 and colours[-1] > 600


def test_load_image_names_unreadable_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(BadImageError, match="bad.png"):
        load_image(bad, 64, 16)


def test_visualize_writes_maps_of_checkpoint(tmp_path):
    vit = build_vit("vit_tiny").eval()
    torch.save(vit.state_dict(), tmp_path / "backbone.pth")  # a plain backbone state dict
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8)).save(tmp_path / "img.jpg")
    written = visualize_main(["--checkpoint", str(tmp_path / "backbone.pth"), "--image_path",
                              str(tmp_path / "img.jpg"), "--output_dir", str(tmp_path / "out"),
                              "--image_size", "64", "96", "--threshold", "0.5"])
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert names == {"img.png"} | {f"{kind}-{name}.png" for kind in ("attn", "mask")
                                   for name in ("head0", "head1", "head2", "mean")}
    assert all(Image.open(p).size == (96, 64) for p in written)
    mask = np.asarray(Image.open(tmp_path / "out" / "mask-head1.png")) > 0  # (64, 96)
    _, image = load_image(tmp_path / "img.jpg", (64, 96), 16)
    attn = last_cls_attention(vit, torch.from_numpy(image))  # (heads, 24)
    with torch.no_grad():
        ref = vit.get_last_selfattention(torch.from_numpy(image)[None])[0, :, 0, 1:]
    torch.testing.assert_close(attn, ref)
    expected = official_threshold(ref.clone(), 0.5)[1].reshape(4, 6)
    np.testing.assert_array_equal(mask, upsample_nearest(expected.numpy(), 16))


def test_visualize_takes_the_official_flags(tmp_path):
    """visualize_attention.py's flag names, deit_* for vit_*, and the student by its key."""
    student, teacher = build_vit("vit_tiny"), build_vit("vit_tiny")
    torch.save({"student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}},
               tmp_path / "full.pth")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), np.uint8)).save(
        tmp_path / "img.png")

    def maps(folder, *flags):
        visualize_main(["--image_path", str(tmp_path / "img.png"), "--image_size", "32", "48",
                        "--output_dir", str(tmp_path / folder), "--threshold", "0.5", *flags])
        return {p.name: p.read_bytes() for p in (tmp_path / folder).iterdir()}

    official = maps("official", "--pretrained_weights", str(tmp_path / "full.pth"),
                    "--checkpoint_key", "student", "--arch", "deit_tiny", "--patch_size", "16")
    ours = maps("ours", "--checkpoint", str(tmp_path / "full.pth"), "--key", "student")
    teacher_maps = maps("teacher", "--checkpoint", str(tmp_path / "full.pth"))
    assert official == ours and len(ours) == 9  # the image, 3 heads and their mean, twice
    assert official["attn-mean.png"] != teacher_maps["attn-mean.png"]
