"""Serving an exported model over HTTP (``python -m dino_fast.serve``): the FastAPI app, the
dynamic batcher, the request guard (API key, body limits), the upload checks, the Prometheus
metrics and the page that shows the attention maps. Needs ``pip install 'dino-fast[serve]'``.
"""
from dino_fast.serving.app import ServeSettings, create_app
from dino_fast.serving.batcher import DynamicBatcher
from dino_fast.serving.images import RequestError, prepare_upload

__all__ = ["DynamicBatcher", "RequestError", "ServeSettings", "create_app", "prepare_upload"]
