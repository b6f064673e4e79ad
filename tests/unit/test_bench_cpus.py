"""Benchmarks keep the load generator and the server they start on separate cores."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmrag.benchmarks.common import client_cpus, other_cpus, pinned

needs_two_cores = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores"
)


@needs_two_cores
def test_auto_gives_the_client_the_last_core_and_the_server_the_rest():
    usable = sorted(os.sched_getaffinity(0))
    client = client_cpus("auto")
    assert client == (usable[-1],)
    assert other_cpus(client) == tuple(usable[:-1])


def test_none_and_explicit_lists():
    assert client_cpus("none") is None
    assert client_cpus("0,1") == (0, 1)
    assert other_cpus(None) is None


@needs_two_cores
def test_a_child_started_while_pinned_inherits_the_mask_and_the_parent_gets_its_own_back():
    before = os.sched_getaffinity(0)
    core = min(before)
    probe = "import os; print(sorted(os.sched_getaffinity(0)))"
    with pinned((core,)):
        assert os.sched_getaffinity(0) == {core}
        child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str([core])
    assert os.sched_getaffinity(0) == before
