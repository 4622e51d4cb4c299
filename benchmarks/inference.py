"""Attention-map inference: ONNX Runtime (and OpenVINO) vs PyTorch eager vs ``torch.compile``,
one table.

Every row computes the same thing on the same input: the last-block CLS attention and the CLS
features of a ViT (``forward_with_attention``; the exported graph of ``python -m
dino_fast.export``), results on the host. Latency is the median per call, images/s is
batch / latency, speed-ups are against PyTorch eager fp32 at the same batch. torch and ONNX
Runtime use the same number of CPU threads. On a CPU, int8 rows are added: ONNX Runtime with
dynamically quantised matrix products (``--int8`` of the export) and, as its baseline, PyTorch's
own dynamic quantisation of the ``nn.Linear`` layers; on a GPU, ONNX Runtime fp16 and PyTorch
bf16 autocast rows. Each ONNX Runtime row names the execution provider that runs it (CUDA with
``onnxruntime-gpu``, else the CPU, fed from and back to the host). ``--openvino`` runs each ONNX
export in OpenVINO (CPU, float32 compute; the int8 export's quantised MatMuls as they are) too.

    python benchmarks/inference.py [--arch vit_small --patch_size 16 --image_size 224]
                                   [--onnx fp32 int8] [--openvino] [--output FILE] [--json FILE]
"""
import argparse
import copy
import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import measure, report  # noqa: E402
from dino_fast.export import AttentionMapPredictor, export_onnx  # noqa: E402
from dino_fast.models import build_vit  # noqa: E402
from dino_fast.ops import use_backend  # noqa: E402


def torch_runner(vit, autocast_dtype=None, compile_=False):
    """A function of ``images`` returning host attentions and features, in PyTorch."""
    device = next(vit.parameters()).device
    forward = vit.forward_with_attention
    if compile_:  # compile the method that runs (torch.compile(vit) would compile forward only)
        forward = torch.compile(forward)

    def run(images):
        with torch.no_grad(), torch.autocast(device.type, autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            features, attn = forward(images)
        return attn[:, :, 0, 1:].float().cpu(), features.float().cpu()
    return run


def onnx_runners(vit, folder: str, arch: str, threads: int, precision: str = "fp32",
                 runtimes=("onnxruntime",)) -> dict:
    """The same function served from one freshly exported dynamic model by each runtime of
    ``runtimes`` (ONNX Runtime, named with the provider that runs it; OpenVINO on the CPU)."""
    path = os.path.join(folder, f"{arch}_{precision}.onnx")
    export_onnx(vit, path, fp16=precision == "fp16", int8=precision == "int8", arch=arch)
    named = {}
    for runtime in runtimes:
        predictor = AttentionMapPredictor(path, threads=threads, runtime=runtime)
        where = predictor.provider.removesuffix("ExecutionProvider")
        named[f"{runtime} {precision} ({'CPU' if runtime == 'openvino' else where})"] = \
            predictor.run
    return named


def eager_int8(vit):
    """PyTorch's dynamic int8 quantization of the Linear layers (a CPU baseline), or None where
    this torch no longer has ``torch.ao.quantization`` (deprecated since 2.10) or has no
    quantized engine."""
    try:
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(copy.deepcopy(vit), {nn.Linear}, dtype=torch.qint8)
    except (ImportError, RuntimeError) as err:
        print(f"note: no PyTorch int8 here ({type(err).__name__}: {err}); the eager int8 row "
              "is left out", file=sys.stderr)
        return None


def runners(vit, arch: str, threads: int, folder: str, compile_: bool,
            onnx_precisions: list[str] | None = None, runtimes=("onnxruntime",)) -> dict:
    """The backends to compare, by name (eager fp32 first: the baseline)."""
    cuda = next(vit.parameters()).is_cuda
    named = {"pytorch eager fp32": torch_runner(vit)}
    if cuda:
        named["pytorch eager bf16"] = torch_runner(vit, torch.bfloat16)
    else:
        int8_vit = eager_int8(vit)
        if int8_vit is not None:
            named["pytorch eager int8"] = torch_runner(int8_vit)
    if compile_:
        named["torch.compile fp32"] = torch_runner(vit, compile_=True)
    for precision in onnx_precisions or ["fp32", "fp16" if cuda else "int8"]:
        named.update(onnx_runners(vit, folder, arch, threads, precision, runtimes))
    return named


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--onnx", nargs="+", choices=["fp32", "fp16", "int8"],
                        help="ONNX Runtime precisions (default: fp32, and fp16 on a GPU or int8)")
    parser.add_argument("--openvino", action="store_true", help="also run each ONNX export in "
                        "OpenVINO on the CPU (pip install 'dino-fast[openvino]')")
    parser.add_argument("--output", help="also write the table to this results file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = build_vit(args.arch, args.patch_size).eval()
    vit.set_attn_backend("eager")
    rows = []
    with tempfile.TemporaryDirectory() as folder, use_backend("reference"):
        named = runners(vit.to(device), args.arch, args.threads, folder, not args.no_compile,
                        args.onnx, ("onnxruntime", "openvino") if args.openvino else
                        ("onnxruntime",))
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
            host = images.cpu().numpy()
            baseline = None
            for name, run in named.items():
                on_host = name.startswith(("onnxruntime", "openvino")) and device.type == "cpu"
                data = host if on_host else images
                ms = measure(lambda run=run, data=data: run(data), warmup=2,
                             repeats=args.repeats, device=device)
                baseline = baseline or ms
                rows.append({"backend": name, "batch": batch, "latency ms": ms,
                             "images/s": batch * 1e3 / ms, "speed-up vs eager": baseline / ms})
    title = (f"Attention-map inference, {args.arch}/{args.patch_size} at {args.image_size}, "
             f"{device.type}, {args.threads} threads")
    return report(rows, ["backend", "batch", "latency ms", "images/s", "speed-up vs eager"],
                  title, args.output, args.json)


if __name__ == "__main__":
    main()
