"""Export a DINO ViT to ONNX: ``images`` in, last-block CLS ``attentions`` and ``features`` out.

``python -m dino_fast.export --checkpoint CKPT --output model.onnx`` (:mod:`.command`, ``--format
onnx``, the default) reads our checkpoints, the official DINO ones (``teacher`` by default,
``--key student``), plain backbone state dicts and ``.safetensors`` files. The
graph (see :mod:`dino_fast.export.exportable`) takes any batch and any image size that is a
multiple of the patch size, or one fixed ``--image_size H W``. Export runs the reference ops
(``dino_fast.ops.use_backend("reference")``), never the Triton kernels: every block but the last
computes attention with PyTorch's ``scaled_dot_product_attention``, which opset 23 (the default)
writes as one ONNX ``Attention`` node, ONNX Runtime's fused attention kernel (opsets below 23
spell it out as MatMul and Softmax); the last block computes its probabilities explicitly, as
they are an output. Before returning, the model is checked with ``onnx.checker`` and ONNX
Runtime's outputs are compared with PyTorch's.
"""
import copy
import logging
import os
import warnings

import numpy as np
import torch

from dino_fast.export.exportable import AttentionMapModel
from dino_fast.export.output import replacing
from dino_fast.export.parity import require_finite
from dino_fast.export.predictor import METADATA_PREFIX, AttentionMapPredictor
from dino_fast.ops import use_backend

DEFAULT_OPSET = 23  # the first with a fused Attention operator


# Largest accepted difference from PyTorch fp32 per precision: (attentions, absolute;
# features, relative to their largest magnitude)
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (1e-2, 1e-2), "int8": (2e-2, 0.1)}


def precision_name(fp16: bool, int8: bool) -> str:
    """``fp16``, ``int8`` or ``fp32``; both flags at once is an error."""
    if fp16 and int8:
        raise ValueError("choose one of fp16 and int8")
    return "fp16" if fp16 else "int8" if int8 else "fp32"


def model_metadata(vit, arch: str, image_size, precision: str) -> dict[str, str]:
    """What the predictor needs to know about the graph, stored in the ONNX metadata."""
    return {"arch": arch, "patch_size": str(vit.patch_embed.patch_size),
            "num_heads": str(vit.blocks[-1].attn.num_heads), "embed_dim": str(vit.embed_dim),
            "image_size": "dynamic" if image_size is None else "x".join(map(str, image_size)),
            "precision": precision}


def export_onnx(vit, output: str, image_size: tuple[int, int] | None = None, fp16: bool = False,
                opset: int = DEFAULT_OPSET, arch: str = "", optimize: bool = False,
                check: bool = True, int8: bool = False, overwrite: bool = False) -> float | None:
    """Export ``vit`` to ``output``; returns the max error against PyTorch when ``check``.

    ``image_size=(H, W)`` fixes the input size (precomputed positional embeddings); otherwise
    height and width are dynamic; the batch always is. ``fp16`` computes in half precision
    (inputs and outputs stay float32). ``int8`` stores the weights of the matrix products in int8
    and quantises their inputs on the fly (ONNX Runtime's dynamic quantisation): a CPU speed-up
    at a small cost in accuracy (see ``TOLERANCES``). ``optimize`` saves ONNX Runtime's
    offline-optimised graph (fused MatMul+Add and LayerNorm), which then runs only on the ONNX
    Runtime build that wrote it. The file is written beside ``output`` and renamed over it once
    checked (:func:`~dino_fast.export.output.replacing`; ``overwrite`` replaces a folder there).
    """
    precision = precision_name(fp16, int8)
    patch = vit.patch_embed.patch_size
    if image_size is not None and any(s <= 0 or s % patch for s in image_size):
        raise ValueError(f"--image_size {image_size} must be positive multiples of the patch "
                         f"size {patch}")
    # Trace a float32 CPU copy: the example input and the graph's scalar tensors are on the CPU,
    # and the caller's model keeps its device, dtype, mode and attention backend.
    vit = copy.deepcopy(vit).to("cpu", torch.float32).eval()
    vit.set_attn_backend("sdpa")  # one Attention node per block at opset >= 23
    graph = AttentionMapModel(copy.deepcopy(vit) if fp16 else vit, image_size,
                              torch.float16 if fp16 else torch.float32).eval()
    if fp16:
        graph.half()
    example = torch.randn(2, 3, *(image_size or (224, 224)))
    dynamic = (0,) if image_size else (0, 2, 3)  # the batch is always dynamic
    dims = {"images": {axis: torch.export.Dim.DYNAMIC for axis in dynamic}}
    with use_backend("reference"), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(graph, (example,), input_names=["images"],
                                    output_names=["attentions", "features"], dynamic_shapes=dims,
                                    opset_version=opset, dynamo=True, verbose=False)
    program.model.metadata_props.update(
        {METADATA_PREFIX + k: v for k, v in model_metadata(vit, arch, image_size,
                                                           precision).items()})
    with replacing(output, overwrite=overwrite) as temporary:
        program.save(temporary)
        if int8:
            _quantize_in_place(temporary)
        if optimize:
            _optimize_in_place(temporary)
        return check_onnx(temporary, vit, image_size, precision, output) if check else None


def _quantize_in_place(path: str):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantized = path + ".int8.tmp"
    logging.disable(logging.WARNING)  # its advice to pre-process: it fuses nothing more here
    try:
        quantize_dynamic(path, quantized, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
        os.replace(quantized, path)
    finally:
        logging.disable(logging.NOTSET)
        if os.path.exists(quantized):
            os.remove(quantized)


def _optimize_in_place(path: str):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = path
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def check_onnx(path: str, vit, image_size=None, precision: str = "fp32",
               name: str | None = None) -> float:
    """``onnx.checker`` on ``path``, then ONNX Runtime vs PyTorch on a random input.

    Prints and returns the max absolute error of the attentions; raises if either side's outputs
    are not finite, or if the attentions' or the features' error (relative to their largest
    magnitude) is above the precision's ``TOLERANCES``. ``vit`` may be on any device; the
    comparison runs in float32 on the host. ``name``: the file the messages name (``path``).
    """
    name = name or path
    import onnx

    onnx.checker.check_model(path)
    patch = vit.patch_embed.patch_size
    size = image_size or (14 * patch, 10 * patch)  # off the training grid: interpolation runs
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    attentions, features = AttentionMapPredictor(path).run(images.numpy())
    device = next(vit.parameters()).device
    with use_backend("reference"), torch.no_grad(), torch.autocast(device.type, enabled=False):
        ref_features, ref_attn = vit.forward_with_attention(images.to(device))
    ref_attn, ref_features = ref_attn.float().cpu(), ref_features.float().cpu()
    require_finite(f"the exported {precision} model {name}",
                   {"ONNX Runtime": (attentions, features), "PyTorch": (ref_attn, ref_features)})
    attn_error = float(np.abs(attentions - ref_attn[:, :, 0, 1:].numpy()).max())
    feat_error = float(np.abs(features - ref_features.numpy()).max())
    feat_scale = float(ref_features.abs().max())
    print(f"ONNX Runtime vs PyTorch at {size[0]}x{size[1]}: max abs error attentions "
          f"{attn_error:.3g}, features {feat_error:.3g} (feature scale {feat_scale:.3g})")
    attn_tol, feat_tol = TOLERANCES[precision]
    if attn_error > attn_tol or feat_error > feat_tol * max(1.0, feat_scale):
        raise RuntimeError(f"the exported {precision} model {name} disagrees with PyTorch beyond "
                           f"{attn_tol} (attentions) or {feat_tol} (features, relative)")
    return attn_error
