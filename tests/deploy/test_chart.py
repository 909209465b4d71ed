"""The Helm chart, rendered by Helm's own engine and checked object by object.

Run: .venv/bin/python -m pytest tests/deploy -q

Every value set renders; every object validates against the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail) for the oldest Kubernetes the
chart supports and the newest one the validator knows; the container command is
parsed by the real `lorabay serve` click command. No cluster is involved.
"""

from __future__ import annotations

import copy
import re

import click
import kubernetes_validate
import pytest
import yaml
from deploy_render import (
    CHART_DIR,
    NAMESPACE,
    PROMETHEUS_OPERATOR_APIS,
    REPO,
    env_of,
    kinds,
    load_chart,
    min_kube_version,
    only,
    render,
    render_text,
    server_container,
)
from helm_python import HelmError, HelmValuesError
from helm_python import lint as helm_lint
from yamllint import linter
from yamllint.config import YamlLintConfig

from lorabay.cli.serve import serve

# The value sets the issue names, plus the defaults. Secrets appear only by name.
VALUE_SETS: dict[str, dict] = {
    "defaults": {},
    "cpu-only": {
        "image": {"repository": "registry.example.com/lorabay"},
        "gpu": {"enabled": False},
        "cpuOnly": {"kvCacheSpaceGiB": 2},
        "base": {"model": "tiny", "pvc": {"claimName": "bases"}, "servedName": "tiny"},
        "quantization": "none",
        "dtype": "bfloat16",
        "maxModelLen": 2048,
        "apiKeys": {"enabled": False},
        "insecure": True,
        "gateway": {"jsonLogs": False},
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}},
        "podDisruptionBudget": {"enabled": False},
    },
    "one-gpu-nf4": {
        "gpu": {"enabled": True, "count": 1, "product": "NVIDIA-L4"},
        "base": {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "hfToken": {"secretName": "hf-token", "key": "token"},
        },
        "quantization": "nf4",
        "dtype": "bfloat16",
        "engine": {
            "maxLoras": 4,
            "maxCpuLoras": 64,
            "maxLoraRank": 64,
            "maxLoaded": 48,
            "maxNumSeqs": 256,
            "args": ["--enable-prefix-caching", "--seed=1"],
        },
        "gateway": {
            "maxBodyBytes": 1048576,
            "maxN": 8,
            "maxBestOf": 32,
            "maxSearchSamples": 32,
            "maxSearchSteps": 8,
        },
        "extraArgs": ["--max-model-len", "8192"],
    },
    "s3-registry-secrets": {
        "registry": {
            "url": "s3://adapters/prod",
            "s3": {
                "endpoint": "https://minio.storage.svc:9000",
                "region": "eu-west-1",
                "credentialsSecret": {"name": "s3-credentials"},
            },
        },
        "apiKeys": {"secretName": "gateway-keys", "key": "keys.yaml"},
        "base": {"hfToken": {"secretName": "hf-token"}},
        "cache": {"persistence": {"enabled": True, "storageClass": "fast", "size": "200Gi"}},
        "trust": {"configMap": "adapter-signers"},
    },
    "autoscaling-monitoring-ingress": {
        "registry": {"url": "s3://adapters/prod"},
        "serviceAccount": {
            "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/lorabay"}
        },
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 8,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "lorabay_requests_in_flight"},
                        "target": {"type": "AverageValue", "averageValue": "32"},
                    },
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
        "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "hosts": [
                {"host": "llm.example.com", "paths": [{"path": "/v1", "pathType": "Prefix"}]}
            ],
            "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}],
        },
        "podDisruptionBudget": {"minAvailable": 1},
        "peers": {"enabled": True, "spillAt": 24, "secret": {"name": "gateway-peers", "key": "k"}},
        "metrics": {"port": 9500},
        "networkPolicy": {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                    }
                }
            ],
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        },
        "probes": {"startup": {"budgetSeconds": 3600, "periodSeconds": 15}},
    },
}
# The monitoring set is rendered as on a cluster with the Prometheus operator.
API_VERSIONS = {"autoscaling-monitoring-ingress": PROMETHEUS_OPERATOR_APIS}
KUBE_VERSIONS = (min_kube_version(), kubernetes_validate.utils.latest_version())

SECRETISH = re.compile(r"(?i)secret|token|password|credential|api_?key|access_?key")


def rendered(name: str, kube_version: str | None = None) -> list[dict]:
    return render(VALUE_SETS[name], API_VERSIONS.get(name, ()), kube_version)


def serve_option_flags() -> set[str]:
    """Every long flag of `lorabay serve`, read from the click command itself."""
    return {
        flag
        for param in serve.params
        if isinstance(param, click.Option)
        for flag in param.opts + param.secondary_opts
        if flag.startswith("--")
    }


def flags_in(container: dict) -> set[str]:
    """The `lorabay serve` flags in a container's arguments (`--flag=value` counts as --flag)."""
    return {arg.split("=", 1)[0] for arg in container["args"] if arg.startswith("--")}


def parse_serve_args(container: dict, tmp_path) -> click.Context:
    """Run the container's arguments through `lorabay serve`'s own parser (not its callback).

    --api-keys, --peer-secret-file and --trust must name existing files; each path inside the pod
    is checked to lie in its Secret's mount, then swapped for a real file here.
    """
    assert container["command"] == ["lorabay", "serve"]
    args = list(container["args"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    for flag, volume in (
        ("--api-keys", "api-keys"),
        ("--peer-secret-file", "peer-secret"),
        ("--trust", "trust"),
    ):
        if flag in args:
            at = args.index(flag) + 1
            assert args[at].startswith(mounts[volume]["mountPath"] + "/")
            assert mounts[volume]["readOnly"] is True
            stand_in = tmp_path / volume
            stand_in.write_text("{}\n")
            args[at] = str(stand_in)
    return serve.make_context("serve", args)


def ports_named(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


# ---------------------------------------------------------------- every value set


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates_against_kubernetes_schemas(name, kube_version):
    objects = rendered(name, kube_version)
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds(objects)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # a CRD, unknown to kubernetes-validate: checked structurally below
        kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_yaml_lints(name):
    config = YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  document-start: disable\n"
        "  line-length: {max: 160}\n"
        "  indentation: {indent-sequences: whatever}\n"
        "  empty-lines: {max-start: 1}\n"
    )
    for path, text in render_text(VALUE_SETS[name], API_VERSIONS.get(name, ())).items():
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        problems = [str(p) for p in linter.run(text, config) if p.level == "error"]
        assert not problems, f"{path}: {problems}"


def test_chart_sources_lint():
    report = helm_lint(CHART_DIR, strict=True)
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 ("icon is recommended") is information.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    config = YamlLintConfig(
        "extends: default\nrules: {document-start: disable, line-length: {max: 100}}\n"
    )
    for source in ("values.yaml", "Chart.yaml"):
        problems = [str(p) for p in linter.run((CHART_DIR / source).read_text(), config)]
        assert not problems, f"{source}: {problems}"


# ------------------------------------------------------- the container command


@pytest.mark.parametrize("name", VALUE_SETS)
def test_container_command_is_real_serve_flags_with_valid_values(name, tmp_path):
    container = server_container(rendered(name))
    flags = flags_in(container)
    assert flags <= serve_option_flags(), flags - serve_option_flags()
    ctx = parse_serve_args(container, tmp_path)  # click raises on an unknown flag or a bad value
    assert ctx.params["port"] == ports_named(container)["http"]
    assert ctx.params["host"] in ("0.0.0.0", "::")
    # Outside loopback the gateway needs API keys, or an explicit --insecure.
    assert ctx.params["api_keys"] or ctx.params["insecure"]
    # Engine flags arrive verbatim, each as one --engine-arg.
    engine_args = VALUE_SETS[name].get("engine", {}).get("args", [])
    assert list(ctx.params["engine_args"]) == engine_args


def test_command_carries_the_values(tmp_path):
    gpu = parse_serve_args(server_container(rendered("one-gpu-nf4")), tmp_path).params
    assert gpu["base"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert gpu["quantization"] == "nf4" and gpu["dtype"] == "bfloat16"
    assert (gpu["max_loras"], gpu["max_cpu_loras"], gpu["max_loaded"]) == (4, 64, 48)
    assert gpu["max_lora_rank"] == "64" and gpu["max_model_len"] == 8192
    assert gpu["registry"] is None and gpu["json_logs"] is True

    cpu = parse_serve_args(server_container(rendered("cpu-only")), tmp_path).params
    assert cpu["base"] == "/models/tiny" and cpu["served_name"] == "tiny"
    assert cpu["quantization"] == "none" and cpu["insecure"] and cpu["api_keys"] is None
    assert cpu["max_model_len"] == 2048 and cpu["json_logs"] is False
    # Unset, the adapter counts are lorabay serve's, sized from the pod's memory limit.
    assert cpu["max_loras"] is None and cpu["max_loaded"] is None

    s3 = parse_serve_args(server_container(rendered("s3-registry-secrets")), tmp_path).params
    assert s3["registry"] == "s3://adapters/prod"


def test_an_unknown_flag_or_a_bad_value_is_caught(tmp_path):
    """The check above has teeth: click refuses what `lorabay serve` would refuse."""
    for extra in (["--engine-port", "9000"], ["--max-model-len", "8"]):
        container = server_container(render({"extraArgs": extra}))
        with pytest.raises(click.UsageError):
            parse_serve_args(container, tmp_path)


def test_every_serve_option_is_reachable_from_values():
    """An option added to `lorabay serve` needs a chart value (and a value set here using it)."""
    rendered_flags = {
        flag for name in VALUE_SETS for flag in flags_in(server_container(rendered(name)))
    }
    missing = serve_option_flags() - rendered_flags
    assert not missing, f"`lorabay serve` options the chart never renders: {sorted(missing)}"


# ------------------------------------------------------------------- secrets


@pytest.mark.parametrize("name", VALUE_SETS)
def test_secrets_are_referenced_never_inlined(name):
    objects = rendered(name)
    assert "Secret" not in kinds(objects)
    container = server_container(objects)
    for var in container["env"]:
        if SECRETISH.search(var["name"]):
            assert "value" not in var, f"{var['name']} is inlined"
            assert "secretKeyRef" in var["valueFrom"], var


def test_s3_credentials_hf_token_and_api_keys_come_from_secrets():
    objects = rendered("s3-registry-secrets")
    container = server_container(objects)
    env = env_of(container)
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_SECRET_ACCESS_KEY",
    }
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["LORABAY_S3_ENDPOINT"]["value"] == "https://minio.storage.svc:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"

    volumes = {
        v["name"]: v for v in only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["api-keys"]["secret"]["secretName"] == "gateway-keys"
    assert volumes["api-keys"]["secret"]["items"] == [{"key": "keys.yaml", "path": "keys.yaml"}]
    mount = {m["name"]: m for m in container["volumeMounts"]}["api-keys"]
    assert mount["readOnly"] is True
    args = container["args"]
    assert args[args.index("--api-keys") + 1] == mount["mountPath"] + "/keys.yaml"


def test_irsa_uses_service_account_annotations_and_no_keys():
    objects = rendered("autoscaling-monitoring-ingress")
    account = only(objects, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(
        env_of(server_container(objects))
    )


def test_default_api_keys_secret_is_named_after_the_release():
    objects = rendered("defaults")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    secret = {v["name"]: v for v in pod["volumes"]}["api-keys"]["secret"]
    assert secret["secretName"] == "lorabay-api-keys"


# ------------------------------------------------------- the engine stays private


@pytest.mark.parametrize("name", VALUE_SETS)
def test_the_engine_has_no_port_and_metrics_have_their_own(name, tmp_path):
    objects = rendered(name)
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(objects)
    ports = ports_named(container)
    # One container, two ports: the gateway's API and its metrics. The engine has none.
    assert len(pod["containers"]) == 1
    assert [p["name"] for p in container["ports"]] == ["http", "metrics"]
    assert not pod.get("hostNetwork") and not any("hostPort" in p for p in container["ports"])
    params = parse_serve_args(container, tmp_path).params
    assert (params["port"], params["metrics_port"]) == (ports["http"], ports["metrics"])
    assert params["metrics_host"] == params["host"]
    assert [p["targetPort"] for p in gateway_service(objects)["spec"]["ports"]] == ["http"]
    assert [p["targetPort"] for p in metrics_service(objects)["spec"]["ports"]] == ["metrics"]
    for service in (o for o in objects if o["kind"] == "Service"):
        targets = [p["targetPort"] for p in service["spec"]["ports"]]
        assert targets in (["http"], ["metrics"])
    if VALUE_SETS[name].get("networkPolicy", {}).get("enabled", True):
        policy = only(objects, "NetworkPolicy")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert [rule["ports"] for rule in policy["spec"]["ingress"]] == [
            [{"protocol": "TCP", "port": ports["http"]}],
            [{"protocol": "TCP", "port": ports["metrics"]}],
        ]


def test_network_policy_is_on_by_default_and_takes_peers_and_the_scraper():
    default = only(rendered("defaults"), "NetworkPolicy")["spec"]["ingress"]
    assert default[0].get("from") is None and default[1].get("from") is None
    objects = rendered("autoscaling-monitoring-ingress")
    api, metrics = only(objects, "NetworkPolicy")["spec"]["ingress"]
    values = VALUE_SETS["autoscaling-monitoring-ingress"]["networkPolicy"]
    pods = only(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert api["from"] == [*values["from"], {"podSelector": {"matchLabels": pods}}]  # + peers
    assert metrics["from"] == values["metricsFrom"]


def gateway_service(objects: list[dict]) -> dict:
    """The Service clients use (not the metrics one, nor the headless peers one)."""
    (service,) = [
        o
        for o in objects
        if o["kind"] == "Service" and o["metadata"]["labels"].get("lorabay/service") == "gateway"
    ]
    return service


def metrics_service(objects: list[dict]) -> dict:
    (service,) = [
        o
        for o in objects
        if o["kind"] == "Service" and o["metadata"]["labels"].get("lorabay/service") == "metrics"
    ]
    return service


def test_gateways_find_each_other_through_a_headless_service():
    objects = rendered("autoscaling-monitoring-ingress")
    (peers,) = [
        o for o in objects if o["kind"] == "Service" and o["spec"].get("clusterIP") == "None"
    ]
    pods = only(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert peers["spec"]["selector"] == pods and not peers["spec"]["publishNotReadyAddresses"]
    port = server_container(objects)["ports"][0]["containerPort"]
    assert peers["spec"]["ports"][0]["port"] == port
    name = peers["metadata"]["name"]
    args = server_container(objects)["args"]
    assert args[args.index("--peers") + 1] == f"dns:{name}.{NAMESPACE}.svc.cluster.local:{port}"
    assert args[args.index("--spill-at") + 1] == "24"
    default = server_container(rendered("defaults"))["args"]
    assert "--peers" in default and "--spill-at" not in default  # the engine's batch
    off = render({"peers": {"enabled": False}})
    assert not {"--peers", "--peer-secret-file"} & flags_in(server_container(off))
    assert [o["kind"] for o in off].count("Service") == 2  # the API's and the metrics'
    pod = only(off, "Deployment")["spec"]["template"]["spec"]
    assert "peer-secret" not in {v["name"] for v in pod["volumes"]}


def test_peers_sign_forwards_with_a_key_from_a_secret():
    objects = rendered("defaults")
    container = server_container(objects)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    secret = {v["name"]: v for v in pod["volumes"]}["peer-secret"]["secret"]
    assert secret["secretName"] == "lorabay-peers"
    assert secret["items"] == [{"key": "peer-secret", "path": "peer-secret"}]
    mount = {m["name"]: m for m in container["volumeMounts"]}["peer-secret"]
    args = container["args"]
    assert args[args.index("--peer-secret-file") + 1] == mount["mountPath"] + "/peer-secret"
    named = only(rendered("autoscaling-monitoring-ingress"), "Deployment")
    volumes = {v["name"]: v for v in named["spec"]["template"]["spec"]["volumes"]}
    assert volumes["peer-secret"]["secret"]["secretName"] == "gateway-peers"


# ------------------------------------------------------------------- probes


@pytest.mark.parametrize("name", VALUE_SETS)
def test_probes_hit_health_and_ready_on_the_gateway_port(name, tmp_path):
    container = server_container(rendered(name))
    probes = {
        kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")
    }
    assert probes["startup"]["path"] == "/health"
    assert probes["liveness"]["path"] == "/health"
    assert probes["readiness"]["path"] == "/ready"
    gateway_port = parse_serve_args(container, tmp_path).params["port"]
    for probe in probes.values():
        assert ports_named(container)[probe["port"]] == gateway_port


def startup_budget(container: dict) -> int:
    probe = container["startupProbe"]
    return probe["failureThreshold"] * probe["periodSeconds"]


def test_startup_budget_covers_a_base_download():
    # 30 minutes by default: a 7-8B base is ~15 GB to download, then load.
    assert startup_budget(server_container(rendered("defaults"))) >= 1800
    custom = server_container(rendered("autoscaling-monitoring-ingress"))
    assert custom["startupProbe"]["periodSeconds"] == 15
    assert 3600 <= startup_budget(custom) < 3600 + 15


@pytest.mark.parametrize("name", VALUE_SETS)
def test_engine_gives_up_before_the_startup_probe(name, tmp_path):
    # The engine's own error reaches the log (and the pod exits non-zero) before the
    # kubelet kills a pod that never got ready.
    container = server_container(rendered(name))
    timeout = parse_serve_args(container, tmp_path).params["engine_start_timeout"]
    assert 0.9 * startup_budget(container) <= timeout < startup_budget(container)


# ------------------------------------------------------------ security context


@pytest.mark.parametrize("name", VALUE_SETS)
def test_non_root_read_only_root_and_writable_caches(name):
    objects = rendered(name)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # Everything the server, Hugging Face, vLLM and torch write lies on a writable volume.
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    env = env_of(container)
    for var in ("LORABAY_HOME", "HF_HOME", "VLLM_CACHE_ROOT", "HOME", "TMPDIR"):
        path = env[var]["value"]
        assert any(path == m or path.startswith(m + "/") for m in writable), (var, path)
    assert {"/tmp", "/dev/shm"} <= set(writable)


# ----------------------------------------------------------- GPU and CPU modes


def test_one_gpu_mode():
    objects = rendered("one-gpu-nf4")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert container["image"].endswith(":0.1.0-gpu")
    assert "VLLM_CPU_KVCACHE_SPACE" not in env_of(container)


def test_cpu_only_mode():
    objects = rendered("cpu-only")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    assert "nvidia.com/gpu" not in str(container["resources"]) + str(pod.get("tolerations"))
    assert "nodeSelector" not in pod
    assert env_of(container)["VLLM_CPU_KVCACHE_SPACE"]["value"] == "2"
    assert container["image"] == "registry.example.com/lorabay:0.1.0"


def test_base_on_a_pvc_is_mounted_read_only_and_offline():
    objects = rendered("cpu-only")
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["base"]["persistentVolumeClaim"] == {"claimName": "bases", "readOnly": True}
    mount = {m["name"]: m for m in container["volumeMounts"]}["base"]
    assert mount == {"name": "base", "mountPath": "/models", "readOnly": True}
    env = env_of(container)
    assert env["HF_HUB_OFFLINE"]["value"] == "1" and "HF_TOKEN" not in env


def test_cache_volume_pvc_or_empty_dir():
    default_volumes = only(rendered("defaults"), "Deployment")["spec"]["template"]["spec"][
        "volumes"
    ]
    assert {v["name"]: v for v in default_volumes}["cache"]["emptyDir"] == {"sizeLimit": "100Gi"}

    objects = rendered("s3-registry-secrets")
    claim = only(objects, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    volumes = only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    cache = {v["name"]: v for v in volumes}["cache"]
    assert cache["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    existing = render({"cache": {"persistence": {"enabled": True, "existingClaim": "shared"}}})
    assert "PersistentVolumeClaim" not in kinds(existing)
    volumes = only(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {v["name"]: v for v in volumes}["cache"]["persistentVolumeClaim"][
        "claimName"
    ] == "shared"


# --------------------------------------------------- PDB, HPA, Ingress, monitoring


def test_pod_disruption_budget_selects_the_pods():
    for name, spec_key, value in (
        ("defaults", "maxUnavailable", 1),
        ("autoscaling-monitoring-ingress", "minAvailable", 1),
    ):
        objects = rendered(name)
        pdb = only(objects, "PodDisruptionBudget")
        assert pdb["spec"][spec_key] == value
        labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "PodDisruptionBudget" not in kinds(rendered("cpu-only"))


def test_autoscaling_targets_the_deployment():
    objects = rendered("autoscaling-monitoring-ingress")
    deployment = only(objects, "Deployment")
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    # The HPA owns the replica count: the Deployment must not fight it on upgrades.
    assert "replicas" not in deployment["spec"]
    assert "HorizontalPodAutoscaler" not in kinds(rendered("defaults"))
    assert only(rendered("defaults"), "Deployment")["spec"]["replicas"] == 1


def test_ingress_routes_only_the_api_to_the_gateway_service():
    objects = rendered("autoscaling-monitoring-ingress")
    ingress = only(objects, "Ingress")
    service = gateway_service(objects)
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    assert path["path"] == "/v1"
    assert path["backend"]["service"] == {
        "name": service["metadata"]["name"],
        "port": {"name": "http"},
    }
    assert "Ingress" not in kinds(rendered("defaults"))
    assert yaml.safe_load((CHART_DIR / "values.yaml").read_text())["ingress"]["hosts"][0][
        "paths"
    ] == [{"path": "/v1", "pathType": "Prefix"}]


# Fields of the ServiceMonitor CRD (monitoring.coreos.com/v1) the chart may use.
SERVICE_MONITOR_SPEC = {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
SERVICE_MONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels"}


def check_service_monitor(monitor: dict, service: dict) -> None:
    """``service``: the metrics Service it must select."""
    """Structural check: kubernetes-validate has no schema for a CRD."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    spec = monitor["spec"]
    assert set(spec) <= SERVICE_MONITOR_SPEC, set(spec) - SERVICE_MONITOR_SPEC
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert spec["endpoints"], "no endpoints"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= SERVICE_MONITOR_ENDPOINT, set(endpoint) - SERVICE_MONITOR_ENDPOINT
        assert endpoint["port"] in port_names and endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint[key])


def test_service_monitor_only_with_the_prometheus_operator():
    values = VALUE_SETS["autoscaling-monitoring-ingress"]
    assert "ServiceMonitor" not in kinds(render(values))  # no CRDs: nothing the API would refuse
    objects = render(values, api_versions=PROMETHEUS_OPERATOR_APIS)
    monitor = only(objects, "ServiceMonitor")
    check_service_monitor(monitor, metrics_service(objects))
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    forced = render({"serviceMonitor": {"force": True}})
    check_service_monitor(only(forced, "ServiceMonitor"), metrics_service(forced))
    off = render({"serviceMonitor": {"enabled": False}}, api_versions=PROMETHEUS_OPERATOR_APIS)
    assert "ServiceMonitor" not in kinds(off)


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": -1}, "at '/replicaCount'"),
        ({"quantization": "int8"}, "at '/quantization'"),
        ({"engine": {"maxLoraRank": 12}}, "at '/engine/maxLoraRank'"),
        ({"engine": {"maxLoaded": 0}}, "at '/engine/maxLoaded'"),
        ({"gpu": {"count": 0}}, "at '/gpu/count'"),
        (
            {"probes": {"startup": {"budgetSeconds": 10}}},
            "at '/probes/startup/budgetSeconds'",
        ),
        ({"registry": {"url": "http://adapters/prod"}}, "at '/registry/url'"),
        ({"autoscaling": {"minReplicas": 0}}, "at '/autoscaling/minReplicas'"),
        ({"gateway": {"port": "8000"}}, "at '/gateway/port'"),
        ({"engine": {"args": ["seed=1"]}}, "at '/engine/args/0'"),
        ({"engine": {"maxNumSeqs": 0}}, "at '/engine/maxNumSeqs'"),
        ({"replicas": 2}, "additional properties 'replicas'"),  # a typo of replicaCount
        # Only the API goes through the Ingress.
        (
            {"ingress": {"hosts": [{"host": "x", "paths": [{"path": "/", "pathType": "Prefix"}]}]}},
            "at '/ingress/hosts/0/paths/0/path'",
        ),
        # Credentials have no place in values: only Secret names do.
        (
            {"registry": {"s3": {"secretAccessKey": "wJalrXUtnFEMI"}}},
            "additional properties 'secretAccessKey'",
        ),
        ({"base": {"hfToken": {"value": "hf_abc"}}}, "additional properties 'value'"),
    ],
)
def test_invalid_values_fail_with_a_schema_error(values, where):
    with pytest.raises(HelmValuesError) as error:
        render(values)
    message = str(error.value)
    assert "schema" in message and where in message, message


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"apiKeys": {"enabled": False}}, "needs insecure=true"),
        ({"insecure": True}, "set apiKeys.enabled=false"),
        ({"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}, "maxReplicas"),
        ({"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}, "secretKeyRef"),
        ({"metrics": {"port": 8000}}, "metrics.port must differ"),
    ],
)
def test_contradictory_values_fail_rendering_with_the_fix(values, says):
    with pytest.raises(HelmError) as error:
        render(values)
    assert says in str(error.value)


def test_schema_covers_every_default_value():
    """values.yaml and values.schema.json agree: every default key is declared."""
    schema = load_chart().schema
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    def walk(values: dict, node: dict, at: str) -> None:
        assert node.get("additionalProperties") is False, f"{at or '/'} accepts unknown keys"
        for key, value in values.items():
            assert key in node["properties"], f"{at}/{key} is not in values.schema.json"
            child = node["properties"][key]
            if isinstance(value, dict) and child.get("additionalProperties") is False:
                walk(value, child, f"{at}/{key}")

    walk(copy.deepcopy(defaults), schema, "")


def test_readme_values_file_renders(tmp_path):
    """The values file the README's Kubernetes section shows is valid and does what it says."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n# gpu\.yaml\n(.*?)```", readme, re.S)
    assert block, "README.md lost its Kubernetes values example (```yaml # gpu.yaml)"
    objects = render(yaml.safe_load(block.group(1)))
    container = server_container(objects)
    params = parse_serve_args(container, tmp_path).params
    assert params["quantization"] == "nf4" and params["registry"].startswith("s3://")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "PersistentVolumeClaim" in kinds(objects)
