"""What ``--int8`` costs in accuracy on a trained model: the same checkpoint exported in fp32
and in int8, both run by ONNX Runtime on labelled images, compared on what users deploy.

Reports the largest attention difference, the IoU of the thresholded masks (keep 60 % of a
head's mass, as ``dino_fast.infer``), the cosine of the CLS features, and weighted k-NN top-1
(T = 0.07) with each model's features, over ``--data_path`` (memory) and ``--val_path``
(queries), both ``<root>/<class>/<image>`` folders:

    python -m benchmarks.int8_accuracy --checkpoint run/checkpoint.pth \\
        --data_path data/train --val_path data/val --image_size 224
"""
import argparse
import os
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import environment, print_table
from dino_fast.cli.args import load_model
from dino_fast.evaluation.attention_maps import threshold_masks
from dino_fast.evaluation.knn import knn_classify, labelled_dataset, topk_accuracy
from dino_fast.export import AttentionMapPredictor
from dino_fast.export.onnx_export import export_onnx


def run_all(predictors: dict, dataset, batch_size: int = 32) -> dict:
    """Per predictor name, attentions ``[N, heads, patches]`` and features ``[N, dim]`` of every
    image (each batch is decoded once and run by every predictor)."""
    outputs = {name: ([], []) for name in predictors}
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + batch_size,
                                                                      len(dataset)))])
        for name, predictor in predictors.items():
            attn, feat = predictor.run(images)
            outputs[name][0].append(attn)
            outputs[name][1].append(feat)
    return {name: (np.concatenate(attn), np.concatenate(feat))
            for name, (attn, feat) in outputs.items()}


def knn_top1(train_features, train_labels, val_features, val_labels, k: int) -> float:
    """Weighted k-NN top-1 (%) on L2-normalised features."""
    train = F.normalize(torch.from_numpy(train_features), dim=1)
    val = F.normalize(torch.from_numpy(val_features), dim=1)
    scores = knn_classify(train, train_labels, val, k, num_classes=int(train_labels.max()) + 1)
    return topk_accuracy(scores, val_labels, ks=(1,))[0]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--key", default="teacher")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--patch_size", type=int, default=None)
    parser.add_argument("--data_path", required=True, help="k-NN memory images")
    parser.add_argument("--val_path", required=True, help="k-NN query images")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args(argv)
    vit = load_model(args.checkpoint, args.arch, args.patch_size, args.key)
    train_set = labelled_dataset(args.data_path, args.image_size)
    val_set = labelled_dataset(args.val_path, args.image_size)
    train_labels = torch.tensor([label for _, label in train_set.samples])
    val_labels = torch.tensor([label for _, label in val_set.samples])
    predictors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            path = os.path.join(tmp, f"{precision}.onnx")
            export_onnx(vit, path, int8=precision == "int8", check=False)  # measured below
            predictors[precision] = AttentionMapPredictor(path,
                                                          providers=["CPUExecutionProvider"])
        train_out, val_out = run_all(predictors, train_set), run_all(predictors, val_set)
    ref_attn, ref_feat = val_out["fp32"]
    rows = []
    for precision in predictors:
        (_, train_feat), (val_attn, val_feat) = train_out[precision], val_out[precision]
        masks, ref_masks = (threshold_masks(a, args.threshold) for a in (val_attn, ref_attn))
        iou = (masks & ref_masks).sum(-1) / np.maximum((masks | ref_masks).sum(-1), 1)
        cosine = F.cosine_similarity(torch.from_numpy(val_feat), torch.from_numpy(ref_feat))
        rows.append({"model": f"onnxruntime {precision}",
                     "max attention error": float(np.abs(val_attn - ref_attn).max()),
                     "mask IoU vs fp32": float(iou.mean()),
                     "feature cosine vs fp32 (min)": f"{cosine.min().item():.4f}",
                     f"{args.k}-NN top-1": knn_top1(train_feat, train_labels, val_feat,
                                                    val_labels, args.k)})
    print_table(rows, list(rows[0]), title=f"int8 vs fp32, {args.checkpoint}, "
                f"{len(val_set)} val images at {args.image_size} px")
    print(environment())
    return rows


if __name__ == "__main__":
    main()
