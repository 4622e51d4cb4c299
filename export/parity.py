"""The check every weight export runs: the exported model, loaded by the library that will serve
it, gives the same CLS embedding as ours at 224 px (the size the positional embeddings were
trained at, where no interpolation runs)."""
import torch

CHECK_SIZE = 224
TOLERANCE = 1e-4  # max absolute difference of the CLS embedding, fp32


@torch.no_grad()
def check_cls_parity(vit, exported_forward, name: str, batch: int = 2) -> float:
    """Max absolute difference between ``vit(images)`` and ``exported_forward(images)`` (both
    ``(B, dim)``) on random 224 px images; prints it and raises above :data:`TOLERANCE`."""
    images = torch.randn(batch, 3, CHECK_SIZE, CHECK_SIZE,
                         generator=torch.Generator().manual_seed(0))
    exported, ours = exported_forward(images), vit.eval()(images)
    require_finite(f"the {name} export", {name: (exported,), "dino_fast": (ours,)})
    error = float((exported - ours).abs().max())
    print(f"{name} vs dino_fast at {CHECK_SIZE}x{CHECK_SIZE}: max abs error of the CLS "
          f"embedding {error:.3g}")
    if not error <= TOLERANCE:
        raise RuntimeError(f"the {name} export disagrees with dino_fast by {error:.3g} "
                           f"(> {TOLERANCE})")
    return error


def require_finite(what: str, outputs: dict):
    """Raise naming the sides of ``outputs`` (``{side: (array or tensor, ...)}``) whose values
    include NaN or an infinity: two such outputs can agree, or fail to, without meaning it."""
    bad = [side for side, arrays in outputs.items()
           if not all(bool(torch.isfinite(torch.as_tensor(a)).all()) for a in arrays)]
    if bad:
        raise RuntimeError(f"{what} failed its check: the output of {' and '.join(bad)} is not "
                           "finite (NaN or infinite values)")
