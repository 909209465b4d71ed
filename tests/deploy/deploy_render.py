"""Render charts/lorabay with Helm's own engine (helm-python-sdk embeds Helm v4's Go SDK).

No cluster and no helm binary: the chart is rendered offline, exactly as `helm
template` would, values.schema.json validation included.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import helm_python as helm
import yaml
from helm_python import _native

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "lorabay"
RELEASE = "lorabay"
NAMESPACE = "ml"
# The API group a cluster with the Prometheus operator's CRDs advertises.
PROMETHEUS_OPERATOR_APIS = ("monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor")


@cache
def load_chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def min_kube_version() -> str:
    """The oldest Kubernetes the chart supports, from Chart.yaml's kubeVersion (">=1.27.0-0")."""
    constraint = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    return re.match(r">=\s*v?(\d+\.\d+\.\d+)", constraint).group(1)


def render_text(
    values: dict | None = None, api_versions: tuple[str, ...] = (), kube_version: str | None = None
) -> dict[str, str]:
    """Template path -> rendered text. Raises HelmValuesError (schema) or HelmRenderError (fail).

    `Chart.render` does not expose the capabilities a cluster would report, so this
    calls the same native entry point with the `api_versions` and `kube_version`
    options that libhelm_c's render accepts (what `helm template --api-versions
    --kube-version` passes).
    """
    options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if api_versions:
        options["api_versions"] = list(api_versions)
    if kube_version:
        options["kube_version"] = f"v{kube_version}"
    payload = _native.call_string(
        "helm_render", load_chart()._raw(), json.dumps(values or {}), json.dumps(options)
    )
    return json.loads(payload)


def render(
    values: dict | None = None, api_versions: tuple[str, ...] = (), kube_version: str | None = None
) -> list[dict]:
    """Every Kubernetes object the chart renders (NOTES.txt left out), in template order."""
    objects = []
    for path, text in sorted(render_text(values, api_versions, kube_version).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def only(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(objects: list[dict]) -> set[str]:
    return {o["kind"] for o in objects}


def server_container(objects: list[dict]) -> dict:
    return only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}
