"""Load on ``python -m dino_fast.serve`` over loopback: batching against no batching.

For each ``--max_batch`` (1: every image runs alone), a fresh server of the same export starts in
a subprocess; ``--clients`` threads each send one image per ``POST /v1/features`` (keep-alive, one
connection each, bodies encoded once) until ``--requests`` answers have come back or
``--max_duration_s`` has passed, after ``--warmup`` requests. Per setting: requests/s and
images/s, p50 and p99 latency, errors (any answer but 200, or a failed connection), the mean
batch size (from ``/metrics``), and the server's resident memory (VmRSS) after the warm-up and
at the end. ``--clients 1`` with batching is the one-request-at-a-time row. The images are
distinct crops of the photos bundled with the package, resized by the server to
``--image_size``.

    python -m benchmarks.serve_load [--arch vit_small --image_size 224 224] [--model M.onnx]
        [--clients 32 --requests 2000 --max_batch 1 32] [--runtime openvino] [--output F.md]
"""
import argparse
import io
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import report  # noqa: E402
from dino_fast.data.folder import bundled_data_path, find_images  # noqa: E402
from dino_fast.serving.client import ServeClient, encode_multipart  # noqa: E402
from dino_fast.serving.process import running_server  # noqa: E402

COLUMNS = ["max_batch", "clients", "requests", "requests/s", "images/s", "p50 ms", "p99 ms",
           "errors", "mean batch", "RSS start MiB", "RSS end MiB", "exit"]


def request_bodies(count: int, seed: int = 0) -> list[tuple[bytes, str]]:
    """``count`` multipart bodies, each one distinct JPEG crop of a bundled photo."""
    import random

    from PIL import Image
    rng = random.Random(seed)
    root = bundled_data_path()
    photos = [Image.open(os.path.join(root, p)).convert("RGB") for p in find_images(root)]
    bodies = []
    for i in range(count):
        photo = photos[i % len(photos)]
        width, height = rng.randint(160, min(480, photo.width)), rng.randint(
            160, min(480, photo.height))
        left, top = rng.randint(0, photo.width - width), rng.randint(0, photo.height - height)
        buffer = io.BytesIO()
        photo.crop((left, top, left + width, top + height)).save(buffer, "JPEG", quality=90)
        bodies.append(encode_multipart([(f"crop{i}.jpg", buffer.getvalue())]))
    return bodies


def resident_mib(pid: int) -> float:
    """The resident memory of process ``pid`` (VmRSS) in MiB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def load(port: int, bodies, clients: int, requests: int, max_duration_s: float) -> dict:
    """Run ``clients`` threads until ``requests`` answers or the time is up; the latencies."""
    latencies, errors, lock = [], [0], threading.Lock()
    deadline = time.monotonic() + max_duration_s
    issued = iter(range(requests))

    def client(index: int):
        connection = ServeClient(port)
        while time.monotonic() < deadline:
            with lock:
                number = next(issued, None)
            if number is None:
                return
            body, content_type = bodies[number % len(bodies)]
            start = time.perf_counter()
            try:
                status, _ = connection.request("POST", "/v1/features", body,
                                               {"Content-Type": content_type})
            except OSError:
                status = None
            with lock:
                latencies.append(time.perf_counter() - start)
                errors[0] += status != 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "errors": errors[0]}


def batch_stats(port: int) -> tuple[float, float]:
    """``(runs, images)`` counted by the server's batch-size histogram."""
    text = ServeClient(port).get("/metrics")[1].decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return float(values["dino_fast_batch_size_count"]), float(values["dino_fast_batch_size_sum"])


def measure_setting(model: str, args, max_batch: int, clients: int, bodies, folder: str) -> dict:
    """One server, one load: the row of the table (the server's log in ``folder``)."""
    flags = ["--max_batch", str(max_batch), "--max_wait_ms", str(args.max_wait_ms),
             "--runtime", args.runtime, "--image_size", *map(str, args.image_size)]
    with running_server(model, *flags, log=os.path.join(folder, "serve.log")) as (
            process, port):
        load(port, bodies, min(clients, args.warmup), args.warmup, args.max_duration_s)
        rss_start, (runs0, images0) = resident_mib(process.pid), batch_stats(port)
        result = load(port, bodies, clients, args.requests, args.max_duration_s)
        rss_end, (runs1, images1) = resident_mib(process.pid), batch_stats(port)
        process.terminate()
        exit_code = process.wait(timeout=60)
    latencies = sorted(result["latencies"])
    done = len(latencies)
    return {"max_batch": max_batch, "clients": clients, "requests": done,
            "requests/s": done / result["seconds"], "images/s": done / result["seconds"],
            "p50 ms": 1e3 * statistics.median(latencies),
            "p99 ms": 1e3 * latencies[min(done - 1, int(0.99 * done))],
            "errors": result["errors"], "mean batch": (images1 - images0) / max(1, runs1 - runs0),
            "RSS start MiB": rss_start, "RSS end MiB": rss_end, "exit": exit_code}


def export_model(args, folder: str) -> str:
    """``--model``, or a freshly exported random ``--arch`` (dynamic size, fp32)."""
    if args.model:
        return args.model
    from dino_fast.export import export_onnx
    from dino_fast.models import build_vit
    path = os.path.join(folder, f"{args.arch}.onnx")
    export_onnx(build_vit(args.arch, args.patch_size).eval(), path, arch=args.arch, check=False)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an ONNX export (default: a random --arch, exported)")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--image_size", type=int, nargs="+", default=[224, 224])
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    parser.add_argument("--clients", type=int, nargs="+", default=[32])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=64)
    parser.add_argument("--max_duration_s", type=float, default=300.0, help="per setting")
    parser.add_argument("--max_batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--distinct_images", type=int, default=200)
    parser.add_argument("--output", help="also write the table to this results file")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    bodies = request_bodies(args.distinct_images)
    with tempfile.TemporaryDirectory() as folder:
        model = export_model(args, folder)
        rows = [measure_setting(model, args, max_batch, clients, bodies, folder)
                for clients in args.clients for max_batch in args.max_batch]
    title = (f"serve load, {os.path.basename(model)} at {'x'.join(map(str, args.image_size))}, "
             f"{args.runtime}, {args.requests} requests of one image, loopback")
    return report(rows, COLUMNS, title, args.output, args.json)


if __name__ == "__main__":
    main()
