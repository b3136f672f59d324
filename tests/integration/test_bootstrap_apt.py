"""Set-up's apt step waits for another apt-get or dpkg instead of failing.

A real lock on ``/var/lib/dpkg/lock-frontend`` (and on ``/var/lib/apt/lists/lock``) is held
by another process while :func:`localfleet.installer.apt_install` installs a package that is
already installed (``redis-server``: apt-get still takes every lock, nothing changes).

apt and dpkg lock with ``fcntl`` (POSIX record locks). The ``flock`` command takes a
``flock(2)`` lock, which on Linux does not conflict with those -- apt-get goes straight
through it -- so the lock here is held the way apt and dpkg hold it, by a small Python
process calling ``fcntl.lockf``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localfleet.installer import apt_install
from specmesh.errors import ServiceError

pytestmark = pytest.mark.integration

DPKG_FRONTEND_LOCK = Path("/var/lib/dpkg/lock-frontend")
LISTS_LOCK = Path("/var/lib/apt/lists/lock")
PACKAGE = "redis-server"

# Takes the lock (waiting up to 30 s for a real apt-get to let go), says so, holds it.
_HOLDER = """
import fcntl, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
f = open(path, "a")
deadline = time.monotonic() + 30
while True:
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except OSError:
        if time.monotonic() > deadline:
            print("busy", flush=True)
            sys.exit(1)
        time.sleep(0.1)
print("held", flush=True)
time.sleep(seconds)
"""
# Exit 0 when the lock is free (taking it for an instant), 1 when someone holds it.
_PROBE = """
import fcntl, sys
f = open(sys.argv[1], "a")
try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(1)
"""


def _privileged() -> list[str]:
    """The prefix that runs a command as root here (skip when there is none)."""
    if not shutil.which("apt-get"):
        pytest.skip("apt-get is absent (not Debian)")
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo")
    if (
        sudo
        and subprocess.run([sudo, "-n", "true"], capture_output=True, timeout=10).returncode == 0
    ):
        return [sudo, "-n"]
    pytest.skip("not root and no password-less sudo: apt-get cannot run")


@pytest.fixture
def hold_lock() -> Iterator[Callable[[Path, float], subprocess.Popen[str]]]:
    """Hold an apt/dpkg lock file from another process for some seconds."""
    prefix = _privileged()
    holders: list[subprocess.Popen[str]] = []

    def hold(path: Path, seconds: float) -> subprocess.Popen[str]:
        holder = subprocess.Popen(
            [*prefix, sys.executable, "-c", _HOLDER, str(path), str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        holders.append(holder)
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n", f"could not take {path}"
        probe = [*prefix, sys.executable, "-c", _PROBE, str(path)]
        assert subprocess.run(probe, timeout=30).returncode == 1, f"{path} is not held"
        return holder

    yield hold
    for holder in holders:
        if holder.poll() is None:
            holder.terminate()  # our own child (or its sudo), by its pid
        holder.wait(timeout=30)


@pytest.fixture
def installed() -> str:
    _privileged()
    if not shutil.which(PACKAGE):
        pytest.skip(f"{PACKAGE} is not installed (the test reinstalls an installed package)")
    return PACKAGE


def test_install_waits_for_the_dpkg_lock(
    hold_lock: Callable[[Path, float], subprocess.Popen[str]], installed: str
) -> None:
    holder = hold_lock(DPKG_FRONTEND_LOCK, 4)

    apt_install(installed, lock_timeout=120)

    # apt-get cannot have finished while the lock was held: the holder is gone by now.
    assert holder.poll() == 0


def test_update_waits_for_the_lists_lock(
    hold_lock: Callable[[Path, float], subprocess.Popen[str]], installed: str
) -> None:
    holder = hold_lock(LISTS_LOCK, 4)

    apt_install(installed, lock_timeout=120, update=True)

    assert holder.poll() == 0


def test_a_lock_held_past_the_bound_fails_with_a_clear_error(
    hold_lock: Callable[[Path, float], subprocess.Popen[str]], installed: str
) -> None:
    hold_lock(DPKG_FRONTEND_LOCK, 60)

    with pytest.raises(ServiceError) as refused:
        apt_install(installed, lock_timeout=1)

    assert "another apt-get or dpkg still holds its lock" in str(refused.value)
