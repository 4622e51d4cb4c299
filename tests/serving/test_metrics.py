"""The metrics in the Prometheus text format: cumulative buckets, a sum and a count that agree,
and paths outside the routes counted as ``other`` (a client cannot grow the label set)."""
from dino_fast.serving.metrics import Metrics


def samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if not line.startswith("#")}


def test_histograms_are_cumulative_and_unknown_paths_are_other():
    metrics = Metrics()
    for seconds in (0.003, 0.02, 0.02, 7.0):
        metrics.observe_request("/v1/features", 200, seconds)
    metrics.observe_request("/wp-admin/../x", 404, 0.001)
    for size in (1, 3, 32):
        metrics.observe_batch(size)
    text = metrics.render(in_flight=2)
    values = samples(text)
    bucket = 'dino_fast_request_seconds_bucket{path="/v1/features",le="%s"}'
    assert [values[bucket % le] for le in ("0.005", "0.025", "5.0", "10.0", "+Inf")] == \
        [1, 3, 3, 4, 4]
    assert values['dino_fast_request_seconds_count{path="/v1/features"}'] == 4
    assert abs(values['dino_fast_request_seconds_sum{path="/v1/features"}'] - 7.043) < 1e-6
    assert values['dino_fast_requests_total{path="other",status="404"}'] == 1
    assert not any("wp-admin" in line for line in text.splitlines())
    assert values['dino_fast_batch_size_bucket{le="4"}'] == 2
    assert values["dino_fast_images_total"] == 36 and values["dino_fast_images_in_flight"] == 2
    assert "# TYPE dino_fast_batch_size histogram" in text.splitlines()
