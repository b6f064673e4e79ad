"""What a Ray cluster that mmrag starts on this machine needs in its environment, for serve and batch alike."""

from __future__ import annotations

import os

__all__ = ["GCS_PORT_WAIT_ENV", "GCS_PORT_WAIT_S", "local_start_environment"]

GCS_PORT_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
# Ray gives a new GCS 30 s to write its port file, then fails the start. On a busy 2-core machine (a vLLM
# engine starting beside it) that was not enough: a batch test's Ray start failed there and passed alone. A
# healthy start takes a few seconds and is not slowed; a start that would have failed waits longer first.
GCS_PORT_WAIT_S = 120


def local_start_environment(address: str | None) -> dict[str, str]:
    """The variables to set before ``ray.init(address=address)`` starts a local cluster: none when joining
    one (``address`` given) or when the user set their own."""
    if address is not None or GCS_PORT_WAIT_ENV in os.environ:
        return {}
    return {GCS_PORT_WAIT_ENV: str(GCS_PORT_WAIT_S)}
