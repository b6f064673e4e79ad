"""Maps the top-level folders onto one import root, ``mmrag``.

A bare ``kernels`` package would shadow Hugging Face's ``kernels`` library, which transformers probes at
import time, so ``kernels/`` is installed as ``mmrag.kernels`` (and likewise the other folders).
"""

from setuptools import find_packages, setup

ROOTS = ("serving", "kernels", "deployments", "benchmarks")

setup(
    packages=[f"mmrag.{name}" for name in find_packages(include=[f"{r}*" for r in ROOTS])],
    package_dir={f"mmrag.{root}": root for root in ROOTS},
)
