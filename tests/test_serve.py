"""``python -m dino_fast.serve`` end to end: a real uvicorn server in a subprocess on loopback.

Served features and maps equal :class:`AttentionMapPredictor`'s on the same prepared images;
concurrent requests batched together give the numbers of one-at-a-time runs; the metrics count
them in the Prometheus text format; ``--runtime openvino`` serves ONNX Runtime's numbers; the API
key is required where set; SIGTERM lets an in-flight request finish and exits 0. Bad input:
tests/serving/test_bad_input.py.
"""
import base64
import io
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from dino_fast.data.folder import load_rgb  # noqa: E402
from dino_fast.evaluation.attention_maps import prepare_image, threshold_masks  # noqa: E402
from dino_fast.export import AttentionMapPredictor  # noqa: E402
from dino_fast.serve import main as serve_main  # noqa: E402
from dino_fast.serving.client import ServeClient  # noqa: E402
from tests._cli import user_error  # noqa: E402
from tests._serve import CAT, COFFEE, IMAGE_SIZE, running_server, tiny_export  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("serve") / "tiny.onnx")


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, "--max_batch", "8", "--max_wait_ms", "300") as (_, port):
        yield port


def reference(model, path, size=IMAGE_SIZE):
    """The predictor's ``(attentions [heads, N], features [dim])`` of one image file."""
    _, pixels = prepare_image(load_rgb(str(path)), size, 16)
    attentions, features = AttentionMapPredictor(model).run(pixels[None])
    return attentions[0], features[0]


def crops(count: int) -> list[tuple[str, bytes]]:
    """``count`` distinct JPEG crops of the cat photo."""
    cat = Image.open(CAT).convert("RGB")
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        cat.crop((10 * i, 5 * i, 300 + 10 * i, 240 + 5 * i)).save(buffer, "JPEG", quality=95)
        files.append((f"crop{i}.jpg", buffer.getvalue()))
    return files


def test_features_of_several_images_equal_the_predictor(model, server, tmp_path):
    status, body = ServeClient(server).post(
        "/v1/features", [(CAT.name, CAT.read_bytes()), (COFFEE.name, COFFEE.read_bytes())])
    assert status == 200, body
    assert [image["name"] for image in body["images"]] == [CAT.name, COFFEE.name]
    assert (body["images"][0]["height"], body["images"][0]["width"]) == IMAGE_SIZE
    for served, path in zip(body["features"], (CAT, COFFEE)):
        np.testing.assert_allclose(served, reference(model, path)[1], atol=TOL)


def test_attention_arrays_and_masks_equal_the_predictor(model, server):
    status, body = ServeClient(server).post("/v1/attention?threshold=0.5",
                                            [(CAT.name, CAT.read_bytes())])
    assert status == 200, body
    image = body["images"][0]
    attentions, _ = reference(model, CAT)
    assert image["grid"] == [IMAGE_SIZE[0] // 16, IMAGE_SIZE[1] // 16]
    np.testing.assert_allclose(image["heads"], attentions, atol=TOL)
    np.testing.assert_allclose(image["mean"], attentions.mean(axis=0), atol=TOL)
    masks = threshold_masks(np.asarray(image["heads"] + [image["mean"]]), 0.5)
    assert np.array_equal(image["masks"]["heads"], masks[:-1].astype(int))
    assert np.array_equal(image["masks"]["mean"], masks[-1].astype(int))


def test_attention_as_pngs_one_per_head(server):
    status, body = ServeClient(server).post("/v1/attention?format=png",
                                            [(COFFEE.name, COFFEE.read_bytes())])
    assert status == 200, body
    image = body["images"][0]
    assert len(image["heads"]) == len(image["masks"]["heads"]) == 3  # the model's heads
    for url in (image["image"], image["mean"], image["masks"]["mean"], *image["heads"]):
        png = Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,"))))
        assert (png.format, png.height, png.width) == ("PNG", *IMAGE_SIZE)


def test_concurrent_requests_are_batched_with_one_at_a_time_numbers(model, server):
    files = crops(6)
    predictor = AttentionMapPredictor(model)
    alone = []
    for _, data in files:
        _, pixels = prepare_image(Image.open(io.BytesIO(data)).convert("RGB"), IMAGE_SIZE, 16)
        alone.append(predictor.run(pixels[None])[1][0])
    before = batch_runs(server)
    served, start = [None] * len(files), threading.Barrier(len(files))

    def request(i):
        start.wait()
        served[i] = ServeClient(server).post("/v1/features", [files[i]])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(files))]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    for (status, body), expected in zip(served, alone):
        assert status == 200, body
        np.testing.assert_allclose(body["features"][0], expected, atol=TOL)
    runs, images = (after - earlier for after, earlier in zip(batch_runs(server), before))
    assert images == len(files) and runs < len(files), (runs, images)  # some ran together


def batch_runs(port: int) -> tuple[int, int]:
    """``(model runs, images run)`` from the batch-size histogram of ``/metrics``."""
    text = ServeClient(port).get("/metrics")[1].decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return int(values["dino_fast_batch_size_count"]), int(float(values["dino_fast_batch_size_sum"]))


def test_metrics_count_requests_in_prometheus_text_format(server):
    client = ServeClient(server)
    client.post("/v1/features", [(CAT.name, CAT.read_bytes())])
    client.post("/v1/features", [("x.jpg", b"not an image")])
    status, text = client.get("/metrics")
    lines = text.decode().splitlines()
    assert status == 200
    assert "# TYPE dino_fast_request_seconds histogram" in lines
    counts = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines
              if not line.startswith("#")}
    assert counts['dino_fast_requests_total{path="/v1/features",status="200"}'] >= 1
    assert counts['dino_fast_requests_total{path="/v1/features",status="422"}'] >= 1
    assert counts['dino_fast_request_seconds_bucket{path="/v1/features",le="+Inf"}'] == \
        counts['dino_fast_request_seconds_count{path="/v1/features"}']


def test_openvino_runtime_serves_the_onnxruntime_numbers(model):
    pytest.importorskip("openvino")
    with running_server(model, "--runtime", "openvino") as (_, port):
        assert "OpenVINO" in ServeClient(port).get("/health")[1].decode()
        status, body = ServeClient(port).post("/v1/attention", [(CAT.name, CAT.read_bytes())])
    assert status == 200, body
    attentions, _ = reference(model, CAT)  # ONNX Runtime
    np.testing.assert_allclose(body["images"][0]["heads"], attentions, atol=1e-4)


def test_api_key_from_the_environment(model):
    with running_server(model, env={"DINO_FAST_API_KEY": "s3cret"}) as (process, port):
        files = [(CAT.name, CAT.read_bytes())]
        status, body = ServeClient(port).post("/v1/features", files)
        assert status == 401 and "API key" in body["error"]
        assert ServeClient(port, api_key="wrong").post("/v1/features", files)[0] == 401
        assert ServeClient(port, api_key="s3cret").post("/v1/features", files)[0] == 200
        assert ServeClient(port).get("/health")[0] == 200  # open: load balancers probe it
        assert "s3cret" not in " ".join(process.args)  # never on the command line


def test_sigterm_lets_the_in_flight_request_finish_and_exits_0(model):
    with running_server(model, "--max_wait_ms", "1500") as (process, port):
        result = {}
        sender = threading.Thread(target=lambda: result.update(
            answer=ServeClient(port).post("/v1/features", [(CAT.name, CAT.read_bytes())])))
        sender.start()
        wait_until_queued(port)  # in the batcher, waiting out its 1.5 s
        process.send_signal(signal.SIGTERM)
        sender.join(timeout=30)
        assert process.wait(timeout=30) == 0
    status, body = result["answer"]
    assert status == 200 and len(body["features"][0]) == 192


def wait_until_queued(port: int, timeout: float = 10.0):
    client = ServeClient(port)
    deadline = time.monotonic() + timeout
    while b'"images_in_flight":0' in client.get("/health")[1]:
        assert time.monotonic() < deadline, "the request never reached the batcher"
        time.sleep(0.02)


@pytest.mark.parametrize("argv,code,says", [
    (["--model", "missing.onnx"], 1, "error: model not found: missing.onnx"),
    (["--model", "m.onnx", "--max_batch", "0"], 2, "--max_batch"),
    (["--model", "m.onnx", "--port", "70000"], 2, "--port"),
])
def test_command_line_errors_are_one_line(capsys, argv, code, says):
    assert says in user_error(capsys, serve_main, argv, code)
