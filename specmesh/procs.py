"""Child processes of the local fleet and the supervisor: started in a session of their
own with their output in a log file, and recognised by pid *and* command line (a pid the
kernel reused for another program is not ours)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["alive", "spawn"]


def spawn(cmd: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a new session (a signal to ours does not reach it), appending its
    stdout and stderr to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(cwd),
            start_new_session=True,
        )


def alive(pid: int, cmd: list[str]) -> bool:
    """Whether ``pid`` runs (not a zombie) and is still the process started with ``cmd``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            running = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        return False
    if running[1:] == cmd[1:]:
        return True
    # redis-server rewrites its command line ("redis-server 127.0.0.1:port")
    return Path(cmd[0]).name == "redis-server" and bool(running) and "redis-server" in running[0]
