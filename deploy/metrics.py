"""Prometheus metrics of one inference app (own registry: apps in one process don't clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "textcls_predict_requests",
            "Predict requests by HTTP status code",
            ["status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "textcls_predict_latency_seconds",
            "Predict request latency (whole request, including queueing)",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.texts = Counter("textcls_predict_texts", "Texts classified", registry=self.registry)
        self.batch_size = Histogram(
            "textcls_batch_size",
            "Texts per model call (dynamic batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.model_id = Gauge(
            "textcls_model_id",
            "Id of the served model (0: none loaded)",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "textcls_model_info",
            "The served model (value 1) with its id and format as labels",
            ["model_id", "format", "device"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "textcls_model_swaps", "Times a new model was swapped in", registry=self.registry
        )
        self.load_failures = Counter(
            "textcls_model_load_failures", "Model loads that failed", registry=self.registry
        )
        self.queue_age = Histogram(
            "textcls_batch_queue_age_seconds",
            "How long each text waited in the batching queue before its model call "
            "(batches are cut from the oldest text once it has waited TEXTCLS_BATCH_MAX_QUEUE_MS)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.model_threads = Gauge(
            "textcls_batch_model_threads",
            "Model calls that may run at once (TEXTCLS_BATCH_CONCURRENCY, 0 = automatic)",
            registry=self.registry,
        )
        self.queued = Gauge(
            "textcls_batch_queue_texts", "Texts waiting for a model call", registry=self.registry
        )
