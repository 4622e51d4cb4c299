"""A small client of the service, on the standard library only (``http.client``).

``ServeClient(port).post("/v1/features", [("cat.jpg", data)])`` returns ``(status, body)``; one
client keeps one connection open (keep-alive), so give each thread its own. Used by the tests
and by ``benchmarks/serve_load.py``; any HTTP client that sends multipart form data works too
(``curl -F image=@cat.jpg http://127.0.0.1:8000/v1/features``).
"""
import http.client
import json
import uuid


def encode_multipart(files: list[tuple[str, bytes]], field: str = "image",
                     content_type: str = "application/octet-stream") -> tuple[bytes, str]:
    """``(body, Content-Type header)`` of a multipart/form-data body with one ``field`` part per
    ``(filename, bytes)`` of ``files``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                     f'filename="{name}"\r\nContent-Type: {content_type}\r\n\r\n'.encode())
        parts += [data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class ServeClient:
    """Requests to a server at ``host:port``; ``api_key`` is sent as ``X-API-Key``."""

    def __init__(self, port: int, host: str = "127.0.0.1", api_key: str | None = None,
                 timeout: float = 60.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.connection = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        """``(status, body bytes)``; reconnects once if the kept-alive connection was closed."""
        headers = {**self.headers, **(headers or {})}
        try:
            return self._send(method, path, body, headers)
        except (ConnectionError, http.client.RemoteDisconnected):  # the server closed it idle
            self.close()
            return self._send(method, path, body, headers)

    def _send(self, method, path, body, headers) -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection(self.host, self.port,
                                                         timeout=self.timeout)
        self.connection.request(method, path, body, headers)
        response = self.connection.getresponse()
        data = response.read()
        if response.will_close:
            self.close()
        return response.status, data

    def post(self, path: str, files: list[tuple[str, bytes]]) -> tuple[int, dict]:
        """POST ``files`` as ``image`` fields; ``(status, decoded JSON body)``."""
        body, content_type = encode_multipart(files)
        status, data = self.request("POST", path, body, {"Content-Type": content_type})
        return status, json.loads(data)

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path``; ``(status, body bytes)``."""
        return self.request("GET", path)

    def close(self):
        """Close the kept-alive connection."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
