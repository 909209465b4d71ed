"""Prometheus metrics of the gateway, labelled by adapter name and version.

The base is labelled ``adapter=<served name>, version="base"``. A reference the
registry does not know is labelled ``adapter="", version=""``: labels come only
from what the registry resolved, so a client cannot grow the label set.
Each gateway owns its own :class:`CollectorRegistry` (tests run several).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series (one timestamp per label set) only double what we export.
disable_created_metrics()

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

ADAPTER = ("adapter", "version")


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorabay_requests",
            "Generation requests answered, by adapter, endpoint and HTTP status.",
            ADAPTER + ("endpoint", "status"),
            registry=r,
        )
        self.errors = Counter(
            "lorabay_request_errors",
            "Generation requests that failed, by adapter and error code.",
            ADAPTER + ("code",),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lorabay_prompt_tokens", "Prompt tokens processed.", ADAPTER, registry=r
        )
        self.generated_tokens = Counter(
            "lorabay_generated_tokens", "Tokens generated.", ADAPTER, registry=r
        )
        self.forwarded = Counter(
            "lorabay_requests_forwarded",
            "Generation requests sent on to the peer gateway that is home to their adapter.",
            ("peer",),
            registry=r,
        )
        self.spilled = Counter(
            "lorabay_requests_spilled",
            "Requests answered here although another gateway is their adapter's home, because "
            "that home was busy (--spill-at): a hot adapter spreads over the gateways.",
            ("peer",),
            registry=r,
        )
        self.active = 0  # requests in flight (RequestTimer counts them; --spill-at reads it)
        self.in_flight = Gauge(
            "lorabay_requests_in_flight",
            "Generation requests being answered now (a signal to autoscale on).",
            registry=r,
        )
        self.in_flight.set_function(lambda: self.active)
        self.latency = Histogram(
            "lorabay_request_latency_seconds",
            "Time from request to the last byte of the answer.",
            ADAPTER,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "lorabay_time_to_first_token_seconds",
            "Time from request to the first streamed token (streaming requests).",
            ADAPTER,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            "lorabay_adapter_loads", "Adapters loaded into the engine.", ADAPTER, registry=r
        )
        self.unloads = Counter(
            "lorabay_adapter_unloads",
            "Adapters unloaded from the engine (least recently used past --max-loaded).",
            ADAPTER,
            registry=r,
        )
        self.load_seconds = Histogram(
            "lorabay_adapter_load_seconds",
            "Time to pull, verify, check and load an adapter into the engine.",
            ADAPTER,
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "lorabay_adapter_refusals",
            "Requests refused because their adapter may not be served, by reason: "
            "incompatible (it does not fit the base), or what --trust found: no_rule, "
            "unsigned, unknown_signer, bad_signature.",
            ADAPTER + ("reason",),
            registry=r,
        )
        # Test-time compute (serve/ttc.py): policy labels on candidates and search steps,
        # the verifier's on its scorings and their time.
        self.candidates = Counter(
            "lorabay_ttc_candidates",
            "Candidates sampled for best-of-N and for beam search (continuations), by policy.",
            ADAPTER,
            registry=r,
        )
        self.search_steps = Counter(
            "lorabay_ttc_search_steps",
            "Beam-search steps (each expands every beam once), by policy.",
            ADAPTER,
            registry=r,
        )
        self.scorings = Counter(
            "lorabay_verifier_scorings",
            "Candidates or partial solutions a verifier scored, by verifier.",
            ADAPTER,
            registry=r,
        )
        self.scoring_seconds = Histogram(
            "lorabay_verifier_seconds",
            "Time spent scoring with a verifier (one engine request each), by verifier.",
            ADAPTER,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "lorabay_adapter_cache_hits",
            "Requests for an adapter that was already loaded in the engine.",
            ADAPTER,
            registry=r,
        )
        self.loaded = Gauge(
            "lorabay_adapters_loaded", "Adapters loaded in the engine now.", registry=r
        )
        self.engine_up = Gauge(
            "lorabay_engine_up",
            "1 when the engine is ready (the state /ready reports), 0 while it is down.",
            registry=r,
        )
        self.registry_fetches = Gauge(
            "lorabay_registry_fetches",
            "Adapter downloads from the registry into the local cache (cache hits excluded).",
            registry=r,
        )
        self.engine_restarts = Counter(
            "lorabay_engine_restarts", "Times the engine was restarted after it died.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
