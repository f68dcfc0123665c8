"""Shared fixtures: short work dirs (Unix socket paths are limited to 108 bytes) and
factories for peers that are always stopped when a test ends, however it ends."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.harness import netns, processes, vhost_client
from tests.harness.driver import GuestImage
from tests.harness.netns import HostNet
from tests.harness.testpmd import Testpmd


def pytest_sessionstart(session):
    """Namespaces and veths that earlier test processes made and could not delete (they
    died) go before this session makes its own; only what their ledgers name."""
    if netns.available():
        for what in netns.sweep_orphans():
            print(f"conftest: removed what a dead test process left: {what}")


@pytest.fixture
def workdir():
    path = Path(tempfile.mkdtemp(prefix="pv", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def net():
    """What one test builds on the host's network (namespaces, veths), all deleted after."""
    hn = HostNet()
    try:
        yield hn
    finally:
        hn.close()


@pytest.fixture
def testpmds(workdir):
    """Factory of Testpmd objects (not started); all closed, newest first, at the end."""
    made = []

    def make(vdevs, name, **kw):
        tp = Testpmd(vdevs if isinstance(vdevs, list) else [vdevs], workdir=workdir,
                     name=name, **kw)
        made.append(tp)
        return tp

    try:
        yield make
    finally:
        for tp in reversed(made):
            tp.close()


@pytest.fixture
def reflectors(workdir):
    """Factory of started ``pyvhost reflector`` processes; all stopped at the end."""
    made = []

    def make(socket, **kw):
        proc = processes.reflector(workdir, socket, **kw)
        made.append(proc)
        return proc

    try:
        yield make
    finally:
        for proc in reversed(made):
            proc.stop()


# -- the in-process back-end of tests/harness/vhost_client.py --------------------------

@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="pvm", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def server(sockdir):
    s = vhost_client.Server(os.path.join(sockdir, "vhost.sock"))
    yield s
    s.close()


@pytest.fixture
def image():
    with GuestImage((vhost_client.MiB, vhost_client.MiB)) as img:
        yield img


@pytest.fixture(autouse=True)
def _close_sent_fds():
    """Our copies of the fds a test sent to a back-end (vhost_client.region_fds)."""
    yield
    while vhost_client._TO_CLOSE:
        with contextlib.suppress(OSError):
            os.close(vhost_client._TO_CLOSE.pop())
