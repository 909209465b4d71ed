"""The gateway's own counters, per adapter version, for one key (the console's traffic page).

``/metrics`` names every tenant's adapters and lives on the scraper's listener; this is
the same counters cut down to the adapters the key may use:

    traffic(gateway.metrics, grant, "tiny")
    # {"adapters": [{"adapter": "team-a/a", "version": "1", "requests": 3, "errors": 0,
    #   "prompt_tokens": 12, "generated_tokens": 48, "latency_sum": 0.9, "latency_count": 3,
    #   "ttft_sum": 0.2, "ttft_count": 3}, ...]}

Counters are totals since the gateway started; the page turns two readings into rates.
The base serves every key, so its counters add up all tenants' requests: only a key
that may use every name sees them.
"""

from __future__ import annotations

from lorabay.serve.keys import KeyGrant
from lorabay.serve.metrics import GatewayMetrics

# metric family -> (sample suffix -> field of a row)
FAMILIES = {
    "lorabay_requests": {"_total": "requests"},
    "lorabay_request_errors": {"_total": "errors"},
    "lorabay_prompt_tokens": {"_total": "prompt_tokens"},
    "lorabay_generated_tokens": {"_total": "generated_tokens"},
    "lorabay_request_latency_seconds": {"_sum": "latency_sum", "_count": "latency_count"},
    "lorabay_time_to_first_token_seconds": {"_sum": "ttft_sum", "_count": "ttft_count"},
}
FIELDS = [name for suffixes in FAMILIES.values() for name in suffixes.values()]


def sees_everything(grant: KeyGrant) -> bool:
    return grant.patterns is None or "*" in grant.patterns


def traffic(metrics: GatewayMetrics, grant: KeyGrant, served_name: str) -> dict:
    rows: dict[tuple[str, str], dict] = {}
    for family in metrics.registry.collect():
        suffixes = FAMILIES.get(family.name)
        if suffixes is None:
            continue
        for sample in family.samples:
            field = suffixes.get(sample.name.removeprefix(family.name))
            adapter, version = sample.labels.get("adapter", ""), sample.labels.get("version", "")
            if field is None or not adapter:  # "": a reference nothing resolved
                continue
            if adapter == served_name and version == "base":
                if not sees_everything(grant):
                    continue
            elif not grant.allows(adapter):
                continue
            row = rows.setdefault(
                (adapter, version),
                {"adapter": adapter, "version": version, **dict.fromkeys(FIELDS, 0)},
            )
            row[field] += sample.value
    return {"adapters": [rows[key] for key in sorted(rows)]}
