"""``python -m dino_fast.export``: write a checkpoint's ViT as an ONNX attention-map model."""
from dino_fast.export.onnx_export import main

if __name__ == "__main__":
    main()
