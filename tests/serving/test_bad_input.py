"""Every bad input is a 4xx with a one-line JSON error naming its cause, and the server serves
the next request: non-image bytes, a truncated and a zero-byte file, a decompression bomb, an
image above ``--max_pixels``, too many images, a wrong content type, a body above the limit, a
client that stops sending, no image field, a bad parameter. A real server in a subprocess."""
import io
import json
import socket
import struct
import zlib

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from dino_fast.serving.client import ServeClient, encode_multipart  # noqa: E402
from tests._serve import CAT, running_server, tiny_export  # noqa: E402

LIMITS = ("--max_images", "3", "--max_pixels", "1000000", "--max_body_mb", "1",
          "--body_timeout_s", "1")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_export(tmp_path_factory.mktemp("bad") / "tiny.onnx")
    with running_server(model, *LIMITS) as (_, port):
        yield port


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (IHDR) is rewritten to declare ``width x height`` pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC
    return bytes(data)


def jpeg(size=(300, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.open(CAT).convert("RGB").resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def post(port, files, path="/v1/features"):
    return ServeClient(port).post(path, files)


def raw(port: int, head: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    """Send ``head`` (request line, headers, maybe part of a body) on a socket and read the
    answer without sending more."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
        except (BrokenPipeError, ConnectionResetError):  # refused before it all went: read why
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1])


def stalled_body(port):
    """Headers announce 100 kB; 100 bytes come, then nothing."""
    body, content_type = encode_multipart([("a.jpg", jpeg())])
    head = (f"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    return raw(port, head + body[:100])


def oversized_body(port):
    """Headers announce 2 MiB, over the 1 MiB limit; the body is never sent."""
    return raw(port, b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-"
               b"data; boundary=b\r\nContent-Length: 2097152\r\n\r\n")


def oversized_chunked_body(port):
    """A chunked body declares no length; a 1.5 MiB image part streams past the 1 MiB limit."""
    body, content_type = encode_multipart([("huge.jpg", b"x" * (3 * 2**19))])
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                      for i in range(0, len(body), 65536))
    head = (f"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    return raw(port, head + chunks + b"0\r\n\r\n")


def wrong_content_type(port):
    return ServeClient(port).request("POST", "/v1/features", b'{"image": "cat.jpg"}',
                                     {"Content-Type": "application/json"})


def no_image_field(port):
    body, content_type = encode_multipart([("a.jpg", jpeg())], field="picture")
    return ServeClient(port).request("POST", "/v1/features", body,
                                     {"Content-Type": content_type})


CASES = {
    "not-an-image": (lambda p: post(p, [("notes.txt", b"hello, these are not pixels")]), 422,
                     "notes.txt: not an image"),
    "zero-bytes": (lambda p: post(p, [("empty.jpg", b"")]), 422, "empty.jpg: empty file"),
    "truncated": (lambda p: post(p, [("cut.jpg", jpeg()[:3000])]), 422,
                  "cut.jpg: truncated or corrupt JPEG image"),
    "decompression-bomb": (lambda p: post(p, [("bomb.png", png_declaring(50000, 50000))]), 413,
                           "bomb.png: decompression bomb"),
    "over-max-pixels": (lambda p: post(p, [("big.jpg", jpeg((1200, 1000)))]), 413,
                        "big.jpg: image of 1200x1000 = 1200000 pixels is over --max_pixels"),
    "too-many-images": (lambda p: post(p, [(f"{i}.jpg", jpeg()) for i in range(4)]), 413,
                        "too many images: at most 3"),
    "wrong-content-type": (wrong_content_type, 415, "multipart/form-data"),
    "no-image-field": (no_image_field, 400, "no image: send one or more files"),
    "body-over-limit": (oversized_body, 413, "request body of 2097152 bytes is over the limit"),
    "chunked-body-over-limit": (oversized_chunked_body, 413,
                                "request body over the limit of 1048576 bytes"),
    "client-stops-sending": (stalled_body, 408, "the client sent no data for 1 s"),
    "bad-threshold": (lambda p: post(p, [("a.jpg", jpeg())], "/v1/attention?threshold=2"), 422,
                      "threshold must be in (0, 1]"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_one_line_4xx_and_the_server_serves_on(server, case):
    send, status, says = CASES[case]
    answer = send(server)
    got, body = answer[0], answer[1]
    if isinstance(body, bytes):  # from ServeClient.request
        body = json.loads(body)
    assert got == status, body
    assert list(body) == ["error"] and says in body["error"] and "\n" not in body["error"]
    good_status, good = post(server, [(CAT.name, CAT.read_bytes())])
    assert good_status == 200 and len(good["features"][0]) == 192
