"""``python -m dino_fast.infer``: attention maps of images with an exported ONNX model.

A thin entry point; the command lives in :mod:`dino_fast.export.infer`.
"""
import sys

from dino_fast.export.infer import main

if __name__ == "__main__":
    sys.exit(main())
