"""The preStop hook of a Ray worker pod: drain this Ray node, then wait until Serve has moved its replicas off.

Kubernetes deletes a worker pod on a node drain, a rolling node upgrade or an eviction; without this, the
container's SIGTERM stops the raylet at once and every request on the pod's replicas is cut. Draining the Ray
node (the call Ray's own autoscaler makes before it removes a node) makes Serve start a replacement replica
elsewhere, then stop the replica here gracefully (``graceful_shutdown_timeout_s``: it finishes its requests),
and move the Serve proxy off the node. The hook returns once no Serve replica lives on the node, or at the
deadline; the pod's ``terminationGracePeriodSeconds`` must cover that deadline (tests/k8s check it).

    python -m mmrag.deployments.drain --deadline-s 900

A pod that holds no replica (the autoscaler removing an idle pod) returns in seconds. Failures are logged and
never block the pod's termination beyond the deadline: a preStop hook that fails only delays SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from collections.abc import Callable

logger = logging.getLogger("mmrag.drain")

REPLICA_CLASS_PREFIX = "ServeReplica:"  # Serve names each replica actor's class ServeReplica:<app>:<deployment>
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"  # "the node goes at the deadline whatever happens"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmrag.deployments.drain", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deadline-s",
        type=int,
        required=True,
        help="Seconds until the pod is killed (keep it below terminationGracePeriodSeconds).",
    )
    parser.add_argument("--poll-s", type=float, default=2.0, help="How often to look for replicas left on the node.")
    parser.add_argument("--address", default="auto", help="Ray address (the pod's own cluster by default).")
    args = parser.parse_args(argv)
    if args.deadline_s <= 0 or args.poll_s <= 0:
        parser.error("--deadline-s and --poll-s must be positive")
    return args


def wait_until_drained(
    replicas_left: Callable[[], int],
    deadline_s: float,
    poll_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll ``replicas_left`` until it is 0 (True) or ``deadline_s`` has passed (False). A failing poll counts
    as replicas left (the state API can time out while the cluster is busy moving them)."""
    end = clock() + deadline_s
    while True:
        try:
            left = replicas_left()
        except Exception as exc:
            logger.warning("could not list the replicas on this node: %s", exc)
            left = -1
        if left == 0:
            return True
        remaining = end - clock()
        if remaining <= 0:
            return False
        sleep(min(poll_s, remaining))


def _drain_node(address: str, node_id: str, deadline_s: int) -> None:
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "drain-node",
        "--address", address,
        "--node-id", node_id,
        "--reason", DRAIN_REASON,
        "--reason-message", "Kubernetes is deleting this pod (preStop)",
        "--deadline-remaining-seconds", str(deadline_s),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"ray drain-node refused: {result.stderr.strip() or result.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s")
    started = time.monotonic()
    try:
        import ray
        from ray.util.state import list_actors

        ray.init(address=args.address, logging_level=logging.WARNING, log_to_driver=False)
        node_id = ray.get_runtime_context().get_node_id()
        _drain_node(args.address, node_id, args.deadline_s)
    except Exception as exc:
        logger.warning("could not drain this Ray node (%s); the pod stops without waiting", exc)
        return 0

    def replicas_left() -> int:
        actors = list_actors(
            filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")],
            limit=10_000,
            raise_on_missing_output=False,
        )
        return sum(1 for actor in actors if (actor.class_name or "").startswith(REPLICA_CLASS_PREFIX))

    remaining = args.deadline_s - (time.monotonic() - started)
    drained = wait_until_drained(replicas_left, remaining, args.poll_s)
    took = time.monotonic() - started
    if drained:
        logger.info("node %s drained in %.0f s", node_id, took)
    else:
        logger.warning("node %s still holds Serve replicas after %.0f s; stopping anyway", node_id, took)
    return 0


if __name__ == "__main__":
    sys.exit(main())
