"""The server's counters and histograms, rendered in the Prometheus text exposition format
(version 0.0.4, https://prometheus.io/docs/instrumenting/exposition_formats/).

``dino_fast_requests_total{path,status}``, ``dino_fast_request_seconds{path}`` (a latency
histogram), ``dino_fast_batch_size`` (images per model run), ``dino_fast_images_total`` and the
``dino_fast_images_in_flight`` gauge. Paths outside the served routes count as ``other``, so a
client cannot grow the label set.
"""
import bisect
import collections

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROUTES = ("/", "/health", "/metrics", "/v1/features", "/v1/attention")


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float):
        """Count ``value`` in its bucket."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` samples; ``labels`` like ``path="/"``."""
        sep = "," if labels else ""
        out, cumulative = [], 0
        for bound, count in zip((*self.bounds, "+Inf"), self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {cumulative}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.sum:.6f}", f"{name}_count{suffix} {self.count}"]


class Metrics:
    """What ``GET /metrics`` shows; updated from the event loop (no locks needed)."""

    def __init__(self):
        self.requests = collections.Counter()  # (path, status) -> count
        self.latency = collections.defaultdict(lambda: Histogram(LATENCY_BUCKETS))
        self.batch_size = Histogram(BATCH_BUCKETS)

    @staticmethod
    def route(path: str) -> str:
        """``path`` when it is one of :data:`ROUTES`, else ``other``."""
        return path if path in ROUTES else "other"

    def observe_request(self, path: str, status: int, seconds: float):
        """Count one answered request."""
        route = self.route(path)
        self.requests[route, status] += 1
        self.latency[route].observe(seconds)

    def observe_batch(self, size: int):
        """Count one model run of ``size`` images."""
        self.batch_size.observe(size)

    def render(self, in_flight: int) -> str:
        """Every metric in the text format; ``in_flight``: images submitted, not answered."""
        lines = ["# HELP dino_fast_requests_total HTTP requests answered, by path and status.",
                 "# TYPE dino_fast_requests_total counter"]
        lines += [f'dino_fast_requests_total{{path="{path}",status="{status}"}} {count}'
                  for (path, status), count in sorted(self.requests.items())]
        lines += ["# HELP dino_fast_request_seconds Time from request to response, by path.",
                  "# TYPE dino_fast_request_seconds histogram"]
        for path in sorted(self.latency):
            lines += self.latency[path].lines("dino_fast_request_seconds", f'path="{path}"')
        lines += ["# HELP dino_fast_batch_size Images per model run.",
                  "# TYPE dino_fast_batch_size histogram",
                  *self.batch_size.lines("dino_fast_batch_size"),
                  "# HELP dino_fast_images_total Images run through the model.",
                  "# TYPE dino_fast_images_total counter",
                  f"dino_fast_images_total {int(self.batch_size.sum)}",
                  "# HELP dino_fast_images_in_flight Images submitted and not answered yet.",
                  "# TYPE dino_fast_images_in_flight gauge",
                  f"dino_fast_images_in_flight {in_flight}"]
        return "\n".join(lines) + "\n"
