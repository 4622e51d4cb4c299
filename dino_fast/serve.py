"""``python -m dino_fast.serve``: an HTTP service of an exported model, with dynamic batching.

    python -m dino_fast.serve --model dino.onnx --port 8000

``POST /v1/features`` (CLS embeddings) and ``POST /v1/attention`` (per-head and mean maps and
their masks, as arrays or PNGs) take images as multipart fields named ``image``; ``GET /health``,
``GET /metrics`` (Prometheus) and ``GET /`` (a page showing the maps) complete the API
(:mod:`dino_fast.serving`). Concurrent requests share model runs of up to ``--max_batch`` images,
gathered for at most ``--max_wait_ms``. It listens on 127.0.0.1 unless ``--host`` says
otherwise. With ``DINO_FAST_API_KEY`` set in the environment (never a flag: a flag's value shows
in ``ps``), every route but ``/`` and ``/health`` needs it as the ``X-API-Key`` header. SIGTERM
or Ctrl-C: the requests in flight finish, then the server exits with status 0.
"""
import argparse
import os
import signal
import sys

from dino_fast.cli.args import add_map_args, add_predictor_args, check_map_args, load_predictor
from dino_fast.cli.errors import MissingDependencyError, add_debug_flag, command
from dino_fast.cli.flags import SERVE, SERVE_PATHS, validate_args

API_KEY_ENV = "DINO_FAST_API_KEY"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dino_fast.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_predictor_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: "
                        "every interface)")
    parser.add_argument("--port", type=int, default=8000)
    add_map_args(parser, [224, 224])  # --threshold: the default of /v1/attention's threshold
    parser.add_argument("--max_batch", type=int, default=32, help="most images in one model run "
                        "(1: no batching)")
    parser.add_argument("--max_wait_ms", type=float, default=5.0, help="how long the first "
                        "image of a batch waits for others")
    parser.add_argument("--max_images", type=int, default=16, help="most images in one request")
    parser.add_argument("--max_pixels", type=int, default=25_000_000, help="most pixels of one "
                        "uploaded image (before resizing); larger ones are refused (413)")
    parser.add_argument("--max_body_mb", type=float, default=64, help="largest request body")
    parser.add_argument("--body_timeout_s", type=float, default=10.0, help="a client that "
                        "sends no part of its body for this long gets 408")
    parser.add_argument("--max_connections", type=int, default=256, help="concurrent "
                        "connections; more are answered 503 (bounds the memory)")
    parser.add_argument("--log_level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"])
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    check_map_args(parser, args, SERVE_PATHS)
    validate_args(args, SERVE, (), parser)
    return args


def import_server():
    """``(uvicorn, dino_fast.serving)``, or a :class:`MissingDependencyError` with the fix."""
    try:
        import uvicorn

        from dino_fast import serving
    except ImportError as err:
        raise MissingDependencyError(f"serve needs {err.name}: pip install "
                                     "'dino-fast[serve]'") from err
    return uvicorn, serving


@command
def main(argv=None) -> int:
    """Command line entry point: serve until SIGTERM or Ctrl-C, then return 0."""
    args = parse_args(argv)
    uvicorn, serving = import_server()
    from dino_fast.export.predictor import pixel_budget
    predictor = load_predictor(args)
    settings = serving.ServeSettings(
        image_size=predictor.image_size or tuple(args.image_size),
        input_pixels=pixel_budget(predictor.num_heads, predictor.patch_size),
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_images=args.max_images,
        max_pixels=args.max_pixels, max_body_bytes=int(args.max_body_mb * 2**20),
        body_timeout_s=args.body_timeout_s, api_key=os.environ.get(API_KEY_ENV) or None,
        threshold=args.threshold)
    app = serving.create_app(predictor, settings)
    print(f"serving {args.model} on {predictor.describe()} at http://{args.host}:{args.port} "
          f"(batches of up to {args.max_batch} images, {args.max_wait_ms:g} ms wait; API key "
          f"{'required' if settings.api_key else 'off'})", flush=True)
    # uvicorn re-raises the signal it handled once it has shut down gracefully; with these
    # handlers in place that re-raise returns here: exit status 0, not 143 or a traceback.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, limit_concurrency=args.max_connections,
                log_level=args.log_level, timeout_keep_alive=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
