"""Serve-side metrics through Ray's metrics API (``ray.serve.metrics``): exported by every Ray node's metrics agent
in Prometheus format, with Serve's own tags (application, deployment, replica) added to each series. Prometheus
names them ``ray_<name>`` (counters with a ``_total`` suffix); infra/monitoring/ has the scrape config and a
Grafana dashboard built on these names (tests/test_infra.py checks that the two agree).

One object per deployment replica, made in its constructor: the metrics are process-wide in Ray, the objects are
just typed handles on them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ray.serve import metrics

# Names as the dashboard queries them (without Ray's ``ray_`` prefix); kept in one place for the infra test.
QUEUE_LENGTH = "dreamcache_queue_length"
UNET_BATCH_IMAGES = "dreamcache_unet_batch_images"
BATCH_SUBJECTS = "dreamcache_batch_subjects"
CACHE_LOOKUPS = "dreamcache_cache_lookups"
IMAGES = "dreamcache_images_generated"
STOPPED = "dreamcache_stopped_batches"
REQUEST_LATENCY = "dreamcache_request_latency_seconds"
ALL = (QUEUE_LENGTH, UNET_BATCH_IMAGES, BATCH_SUBJECTS, CACHE_LOOKUPS, IMAGES, STOPPED, REQUEST_LATENCY)

# Ray 2.60 drops a gauge from its metrics export a few report intervals after its last set() (seen here: gone
# about 30 s after a single set, while counters and histograms stay): a gauge that is only set when it changes
# vanishes from Prometheus on an idle replica instead of reading 0. GeneratorMetrics sets it again this often.
GAUGE_REFRESH_S = 5.0

_BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]
_LATENCY_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class GeneratorMetrics:
    def __init__(self, queue_length: Callable[[], int]) -> None:
        """``queue_length``: the replica's current queue, read from a daemon thread every GAUGE_REFRESH_S (and
        set at each change by the replica itself), so that the gauge stays exported while nothing changes."""
        self.queue_length = metrics.Gauge(
            QUEUE_LENGTH, description="generate requests on this replica waiting for a pipeline call")
        self._current_queue_length = queue_length
        threading.Thread(target=self._refresh_gauges, name="dreamcache-gauges", daemon=True).start()
        self.batch_images = metrics.Histogram(
            UNET_BATCH_IMAGES, description="images per UNet batch (one pipeline call)", boundaries=_BATCH_BOUNDARIES)
        self.batch_subjects = metrics.Histogram(
            BATCH_SUBJECTS, description="distinct subjects per UNet batch", boundaries=_BATCH_BOUNDARIES)
        self.cache_lookups = metrics.Counter(
            CACHE_LOOKUPS, description="subject cache lookups by result: hit (resident) or loaded (from the store)",
            tag_keys=("result",))
        self.images = metrics.Counter(IMAGES, description="images generated (rate: images/s)")
        self.stopped = metrics.Counter(
            STOPPED, description="pipeline calls stopped between steps: deadline passed or every client gone",
            tag_keys=("reason",))

    def _refresh_gauges(self) -> None:
        while True:  # a daemon thread: it ends with the replica's process
            time.sleep(GAUGE_REFRESH_S)
            self.queue_length.set(self._current_queue_length())


class IngressMetrics:
    def __init__(self) -> None:
        self.latency = metrics.Histogram(
            REQUEST_LATENCY, description="HTTP request latency at the ingress, to the last byte, by route and status",
            boundaries=_LATENCY_BOUNDARIES, tag_keys=("route", "status"))
