"""The linear probe's per-arch defaults (``dino_fast.evaluation.linear``); the command's own
tests are in tests/test_eval_linear.py."""
from dino_fast.evaluation import linear


def test_vit_large_is_evaluated_as_vit_base():
    """The paper gives defaults up to vit_base (1 block + avgpool for the wide model); vit_large
    takes vit_base's."""
    assert linear.default_feature_args("vit_large") == linear.default_feature_args("vit_base")
    assert linear.default_feature_args("vit_large") == (1, True)
