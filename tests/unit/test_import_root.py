"""Our `kernels/` folder must never pass for Hugging Face's `kernels` library (transformers probes it)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_kernels_folder_is_importable_under_mmrag():
    import mmrag.kernels

    assert mmrag.kernels.__name__ == "mmrag.kernels"
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_transformers_probe_sees_no_kernels_library_from_repo_root():
    # `python -c` puts the working directory first on sys.path: the bare `kernels/` folder is visible.
    code = (
        "import importlib.util, sys\n"
        "from transformers.utils import import_utils as u\n"
        "print(u.is_kernels_available())\n"
        "mod = sys.modules.get('kernels')\n"
        "print(getattr(mod, '__file__', None))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    available, kernels_file = out.stdout.split()[-2:]
    assert available == "False"
    assert kernels_file == "None"  # at most an inert namespace was touched, no module of ours ran
