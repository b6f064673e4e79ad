"""What every replica's constructor does first, whatever its deployment."""

from __future__ import annotations

from typing import Any

from mmrag.deployments.loopback import keep_replica_grpc_on_loopback
from mmrag.serving.config import MmragConfig
from mmrag.serving.logs import configure_logging


def start_replica(config: dict[str, Any] | MmragConfig) -> MmragConfig:
    """The replica's gRPC server kept on loopback where ``mmrag serve`` asks (before Serve starts it, right after
    the constructor), its configuration validated, and mmrag's loggers handed to Serve's replica logger at the
    configured level (without it a replica's INFO records, such as its start-up times, went nowhere)."""
    keep_replica_grpc_on_loopback()
    config = config if isinstance(config, MmragConfig) else MmragConfig.model_validate(config)
    configure_logging(config.server)
    return config
