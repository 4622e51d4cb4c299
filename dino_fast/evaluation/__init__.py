"""Evaluating DINO features as the official scripts do: weighted k-NN (:mod:`.knn`,
``eval_knn.py``), the linear probe (:mod:`.linear`, ``eval_linear.py``) and the last block's CLS
attention maps and masks (:mod:`.attention_maps`, ``visualize_attention.py``)."""
from dino_fast.evaluation.attention_maps import (
    cls_patch_attention,
    save_attention_maps,
    threshold_masks,
)
from dino_fast.evaluation.knn import dataset_features, knn_classify, knn_scores
from dino_fast.evaluation.linear import LinearClassifier

__all__ = ["LinearClassifier", "cls_patch_attention", "dataset_features", "knn_classify",
           "knn_scores", "save_attention_maps", "threshold_masks"]
