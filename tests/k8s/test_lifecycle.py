"""Graceful scale-in, drains and upgrades: a replica that stops finishes its requests, a pod that goes first
drains its Ray node, and every Kubernetes timer covers the Serve timer inside it."""

from __future__ import annotations

import itertools

import pytest

from mmrag.deployments import drain
from mmrag.serving.config import DeploymentConfig, MmragConfig
from tests.k8s.manifests import (
    OVERLAYS,
    fits,
    mmrag_app,
    ray_container,
    ray_node_resources,
    rayservice,
    replica_needs,
    serve_config,
)

RAY_STOP_S = 10  # after the preStop hook: SIGTERM, the raylet and its workers exit


def app_config(overlay: str) -> MmragConfig:
    return MmragConfig.model_validate(mmrag_app(serve_config(f"overlays/{overlay}"))["args"])


def deployments(config: MmragConfig) -> dict[str, DeploymentConfig]:
    return {name: getattr(config.deployments, name) for name in type(config.deployments).model_fields}


def test_graceful_shutdown_reaches_serve():
    options = DeploymentConfig(graceful_shutdown_timeout_s=600, graceful_shutdown_wait_loop_s=1).serve_options()
    assert (options["graceful_shutdown_timeout_s"], options["graceful_shutdown_wait_loop_s"]) == (600, 1)
    assert DeploymentConfig().serve_options()["graceful_shutdown_timeout_s"] == 20, "Serve's own default"


@pytest.mark.slow  # importing ray.serve: ~8 s alone, shared with test_serve_config.py in a full run
def test_serve_accepts_the_graceful_shutdown_options():
    from ray import serve

    @serve.deployment
    class Probe:
        pass

    deployment = Probe.options(**DeploymentConfig(graceful_shutdown_timeout_s=600).serve_options())
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 600


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_requests_in_flight_outlive_a_stopping_replica(overlay):
    """Serve's default (20 s) cut every generation longer than that on scale-in, a drain or an update."""
    config = app_config(overlay)
    for name in ("ingress", "llm"):
        stage = deployments(config)[name]
        assert stage.graceful_shutdown_timeout_s >= config.server.request_timeout_s, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_pods_drain_before_they_go(overlay):
    """Each worker group's preStop drains its Ray node with a deadline that covers the longest graceful
    shutdown of any deployment that can run on it, and the pod's grace period covers that deadline."""
    config = app_config(overlay)
    for group in rayservice(f"overlays/{overlay}")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        name = group["groupName"]
        container = ray_container(group["template"])
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "mmrag.deployments.drain"], name
        args = drain.parse_args(command[3:])
        shape = ray_node_resources(group)
        here = [d for d in deployments(config).values() if fits(replica_needs(d), shape)]
        assert here, f"{name} runs no deployment"
        assert args.deadline_s >= max(d.graceful_shutdown_timeout_s for d in here), name
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= args.deadline_s + RAY_STOP_S, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_upgrade_lets_the_old_cluster_finish_its_requests(overlay):
    """upgradeStrategy NewCluster switches the Service, then deletes the old cluster after this delay."""
    spec = rayservice(f"overlays/{overlay}")["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    assert spec["rayClusterDeletionDelaySeconds"] >= app_config(overlay).server.request_timeout_s


def test_head_has_no_drain_hook():
    """The head holds the GCS and the Serve controller: draining it is not a thing; its loss is a restart."""
    head = ray_container(rayservice("overlays/prod-gpu")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])
    assert "lifecycle" not in head


# ---- the drain hook itself ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_drain_waits_until_the_replicas_are_gone():
    clock = FakeClock()
    left = iter([2, 2, 1, 0])
    assert drain.wait_until_drained(lambda: next(left), 60, 2, clock=clock, sleep=clock.sleep)
    assert clock.now == 6


def test_drain_gives_up_at_the_deadline():
    clock = FakeClock()
    assert not drain.wait_until_drained(lambda: 1, 7, 2, clock=clock, sleep=clock.sleep)
    assert clock.now == 7, "the last wait is cut to the deadline"


def test_a_failing_poll_counts_as_replicas_left():
    clock = FakeClock()
    calls = itertools.count()

    def flaky() -> int:
        if next(calls) == 0:
            raise TimeoutError("state API busy")
        return 0

    assert drain.wait_until_drained(flaky, 60, 2, clock=clock, sleep=clock.sleep)
    assert clock.now == 2


def test_drain_returns_at_once_without_ray(monkeypatch):
    """A pod whose Ray is already gone must not hold its termination: the hook logs and exits 0."""
    import ray

    def no_cluster(*args, **kwargs):
        raise ConnectionError("no Ray cluster here")

    monkeypatch.setattr(ray, "init", no_cluster)
    assert drain.main(["--deadline-s", "30"]) == 0


@pytest.mark.parametrize("argv", [["--deadline-s", "0"], ["--deadline-s", "10", "--poll-s", "0"], []])
def test_drain_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit):
        drain.parse_args(argv)
