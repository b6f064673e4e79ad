"""Maps the top-level folders onto one import root, ``mmrag``.

``kernels/`` is installed as ``mmrag.kernels`` and has no ``__init__.py``: run from the repository root
(where the folder sits on ``sys.path``), a bare ``kernels`` is then only a PEP 420 namespace, which the
transformers probe for Hugging Face's ``kernels`` library recognises as "not installed" without running
any of our code.
"""

from setuptools import find_namespace_packages, find_packages, setup

ROOTS = ("serving", "kernels", "deployments", "benchmarks", "training")

packages = find_packages(include=[f"{r}*" for r in ROOTS if r != "kernels"])
packages += find_namespace_packages(include=["kernels", "kernels.*"], exclude=["*__pycache__*"])

setup(
    packages=[f"mmrag.{name}" for name in packages],
    package_dir={f"mmrag.{root}": root for root in ROOTS},
)
