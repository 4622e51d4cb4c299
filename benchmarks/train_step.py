"""Images/s of the whole DINO training step: student on all crops, teacher on the 2 globals,
loss, backward, optimizer, EMA, with the crops already on the device.

Configurations, measured in one run:
* ``official``: the official execution: eager attention, the eager (reference) loss, a
  per-parameter EMA loop, fp16 autocast on CUDA (fp32 on the CPU), no compile;
* ``fast``: our path: the fused ops (``DINO_FAST_BACKEND=auto``), SDPA or Triton attention,
  the flat-buffer EMA, bf16 on CUDA;
* ``fast+compile``: the same with ``torch.compile``.

On a GPU it also reports the model FLOP utilisation against 790 TFLOP/s (bf16 dense peak of an
H100/H200 as measured in ../shared/GPU.md), with 123.8 GFLOP per image for ViT-S/16 and 474.1 for
ViT-B/16 at 2x224 + 10x96 crops (forward + backward).

    python benchmarks/train_step.py                      # CPU defaults: small and quick
    python benchmarks/train_step.py --arch vit_small --batch 128 --local_crops 10 --out_dim 65536
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import measure, print_table, write_results  # noqa: E402
from dino_fast.ema import TeacherEMA  # noqa: E402
from dino_fast.engine import TrainStep  # noqa: E402
from dino_fast.loss import DINOLoss  # noqa: E402
from dino_fast.ops import use_backend  # noqa: E402
from dino_fast.optim import build_optimizer, get_params_groups  # noqa: E402
from dino_fast.train import build_parser, build_models  # noqa: E402

GFLOP_PER_IMAGE = {("vit_small", 16): 123.8, ("vit_base", 16): 474.1}  # 2x224 + 10x96, fwd+bwd
PEAK_TFLOPS = 790.0


class PerParameterEMA:
    """The official EMA: a Python loop over parameter pairs (the baseline)."""

    def __init__(self, student, teacher):
        self.pairs = list(zip(student.parameters(), teacher.parameters()))

    @torch.no_grad()
    def update(self, momentum):
        for q, k in self.pairs:
            k.data.mul_(momentum).add_((1 - momentum) * q.detach().data)


def build_step(args, device, attn_backend, precision, official, compile):
    """A TrainStep over fresh models for one configuration."""
    train_args = build_parser().parse_args([
        "--arch", args.arch, "--patch_size", str(args.patch_size), "--out_dim", str(args.out_dim),
        "--local_crops_number", str(args.local_crops), "--attn_backend", attn_backend])
    torch.manual_seed(0)
    student, teacher = build_models(train_args, device)
    ema = PerParameterEMA(student, teacher) if official else TeacherEMA(student, teacher)
    loss = DINOLoss(args.out_dim, args.local_crops + 2, 0.04, 0.04, 0, 10).to(device)
    optimizer = build_optimizer("adamw", get_params_groups(student))
    return TrainStep(student, teacher, loss, optimizer, ema, precision=precision,
                     compile=compile)


def random_crops(args, device):
    """2 global and ``local_crops`` local crops of ``batch`` images, on the device."""
    glob = [torch.randn(args.batch, 3, 224, 224, device=device) for _ in range(2)]
    local = [torch.randn(args.batch, 3, 96, 96, device=device) for _ in range(args.local_crops)]
    return glob + local


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--arch", default="vit_small" if cuda else "vit_tiny")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128 if cuda else 4)
    parser.add_argument("--local_crops", type=int, default=10 if cuda else 2)
    parser.add_argument("--out_dim", type=int, default=65536 if cuda else 4096)
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3)
    parser.add_argument("--configs", default="official,fast,fast+compile")
    parser.add_argument("--output", default=None, help="write the table to this markdown file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    fast_attn = "sdpa"
    configs = {
        "official": dict(attn_backend="eager", precision="fp16" if cuda else "fp32",
                         official=True, compile=False, backend="reference"),
        "fast": dict(attn_backend=fast_attn, precision="bf16" if cuda else "fp32",
                     official=False, compile=False, backend="auto"),
        "fast+compile": dict(attn_backend=fast_attn, precision="bf16" if cuda else "fp32",
                             official=False, compile=True, backend="auto"),
    }
    crops = random_crops(args, device)
    rows = []
    for name in args.configs.split(","):
        cfg = dict(configs[name])
        with use_backend(cfg.pop("backend")):
            step = build_step(args, device, **cfg)
            ms = measure(lambda: step(crops, 1, 1e-4, 0.04, 0.996), warmup=2,
                         repeats=args.repeats, device=device)
        images_s = args.batch / (ms / 1e3)
        row = {"config": name, "arch": f"{args.arch}/{args.patch_size}", "batch": args.batch,
               "crops": f"2x224+{args.local_crops}x96", "K": args.out_dim,
               "step ms": ms, "images/s": images_s}
        gflop = GFLOP_PER_IMAGE.get((args.arch, args.patch_size))
        if cuda and gflop and args.local_crops == 10:
            row["MFU %"] = 100 * images_s * gflop / 1e3 / PEAK_TFLOPS
        rows.append(row)
        step = None  # free this configuration before building the next
    baseline = next((r for r in rows if r["config"] == "official"), rows[0])["images/s"]
    for row in rows:
        row["speed-up"] = row["images/s"] / baseline  # against the official style when measured
    table = print_table(rows, ["config", "arch", "batch", "crops", "K", "step ms", "images/s",
                               "speed-up", "MFU %"], title="DINO training step")
    if args.output:
        write_results(args.output, table)


if __name__ == "__main__":
    main()
