"""The console's lineage graph, redaction and traffic cut, without a browser or a server."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from lorabay.hub.manifest import Manifest, digest_files
from lorabay.serve.keys import OPEN, KeyGrant
from lorabay.serve.metrics import GatewayMetrics
from lorabay.serve.ui.lineage import HIDDEN, hider, lineage_graph
from lorabay.serve.ui.traffic import traffic


def version(name: str, number: int, parent: str | None = None, method: str | None = "sft"):
    sha = hashlib.sha256(f"{name}:{number}".encode()).hexdigest()
    files = [{"path": "adapter_model.safetensors", "size": 100, "sha256": sha}]
    lineage = {"method": method, "parent_digest": parent, "hyperparameters": {}, "metrics": {}}
    return Manifest(
        name=name,
        version=number,
        digest=digest_files(files),
        files=files,
        peft={"r": 8},
        base={"id": "tiny"},
        lineage=lineage,
    )


def test_a_parent_another_tenant_owns_is_its_digest_alone_and_its_children_are_not_drawn():
    theirs = version("team-b/root", 1)
    mine = version("team-a/tuned", 1, parent=theirs.digest)
    their_child = version("team-b/next", 1, parent=mine.digest)
    graph = lineage_graph(mine, [mine], hider({"team-b/root"}, KeyGrant(("team-a/*",)).allows))
    kinds = [(n["kind"], n.get("ref")) for n in graph["nodes"]]
    assert kinds == [("base", None), ("hidden", None), ("adapter", "team-a/tuned:1")]
    assert graph["nodes"][1] == {"id": theirs.digest, "kind": "hidden", "label": HIDDEN}
    assert "team-b" not in repr(graph) and their_child.digest not in repr(graph)
    assert graph["edges"][-1] == {"from": "base", "to": theirs.digest, "label": "", "dashed": True}


def test_a_loop_of_parents_ends_in_a_more_node():
    a = version("team-a/a", 1)
    b = version("team-a/b", 1, parent=a.digest)
    looped = replace(a, lineage={**a.lineage, "parent_digest": b.digest})  # a -> b -> a
    graph = lineage_graph(looped, [looped, b], lambda value: value)
    assert [n["kind"] for n in graph["nodes"]] == ["base", "more", "adapter", "adapter"]


def test_text_naming_another_tenants_adapter_is_redacted():
    hide = hider({"team-b/judge", "team-a/policy"}, KeyGrant(("team-a/*",)).allows)
    value = {
        "judge": "team-b/judge:3@sha256:" + "a" * 64,
        "policy": "team-a/policy:1",
        "nested": ["team-b/judge", "adamw", 3],
        "free text": "not a reference at all",
    }
    assert hide(value) == {
        "judge": HIDDEN,
        "policy": "team-a/policy:1",
        "nested": [HIDDEN, "adamw", 3],
        "free text": "not a reference at all",
    }


def test_traffic_is_cut_to_the_keys_adapters_and_the_base_to_keys_for_everything():
    metrics = GatewayMetrics()
    for adapter, version_ in (("team-a/x", "1"), ("team-b/y", "2"), ("tiny", "base"), ("", "")):
        metrics.requests.labels(adapter, version_, "chat/completions", "200").inc(2)
        metrics.generated_tokens.labels(adapter, version_).inc(10)
        metrics.latency.labels(adapter, version_).observe(0.5)
    team_a = traffic(metrics, KeyGrant(("team-a/*",)), "tiny")["adapters"]
    assert [(r["adapter"], r["requests"], r["generated_tokens"]) for r in team_a] == [
        ("team-a/x", 2, 10)
    ]
    assert team_a[0]["latency_count"] == 1 and team_a[0]["latency_sum"] == 0.5
    everything = traffic(metrics, OPEN, "tiny")["adapters"]
    assert [r["adapter"] for r in everything] == ["team-a/x", "team-b/y", "tiny"]
