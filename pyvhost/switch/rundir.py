"""The switch's run directory and the names that become files in it: who may own it, the
exclusive lock that makes one switch per run directory, the names bridges and ports may
have, and the only way the switch removes a file (a socket, checked with lstat).

Only the file system and the process's credentials here: no sockets are served, nothing of
the switch, the store or the datapath is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import re
import stat
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
CTL_SOCK = "ctl.sock"
STORE = "conf.db"
LOCK = "pyvhost.pid"
RESERVED = {CTL_SOCK, STORE, LOCK, STORE + "-journal", STORE + "-wal", STORE + "-shm"}
RUN_DIR_MODE = 0o750


class RunDirError(Exception):
    """The run directory cannot be used (owner, mode, another switch): one line for users."""


def check_name(kind: str, name: str) -> None:
    """A bridge or port name: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}``, not all digits (rules
    name ports by number too), and not one whose socket is a file of the switch's own."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(f"{kind} name {name!r}: 1 to 32 of A-Z a-z 0-9 _ . - "
                         "(not starting with . or -)")
    if name.isdigit():
        raise ValueError(f"{kind} name {name!r}: all digits (rules name ports by number)")
    if name in RESERVED or f"{name}.sock" in RESERVED:
        raise ValueError(f"{kind} name {name!r}: collides with the switch's own files")


def group_id(group: str | int) -> int:
    """A group name or number -> gid (ValueError if there is no such group)."""
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no group named {group!r}") from None


def prepare(run_dir: Path, gid: int | None = None) -> Path:
    """Create ``run_dir`` (0750, group ``gid`` if given: the group that may reach the
    sockets in it) if it is missing; refuse one owned by another user or writable by
    others (anyone could then replace our sockets)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, mode=RUN_DIR_MODE)
        if gid is not None:
            os.chown(run_dir, -1, gid)
        os.chmod(run_dir, RUN_DIR_MODE)             # the umask may have narrowed or not
    except FileExistsError:
        pass
    except OSError as e:
        raise RunDirError(f"run dir {run_dir}: {e.strerror}") from None
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run dir {run_dir}: not a directory")
    if st.st_uid != os.geteuid():
        raise RunDirError(f"run dir {run_dir}: owned by uid {st.st_uid}, not by this user "
                          f"({os.geteuid()})")
    if st.st_mode & stat.S_IWOTH:
        raise RunDirError(f"run dir {run_dir}: writable by others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod o-w it")
    return run_dir


class RunLock:
    """An exclusive lock on RUN_DIR/pyvhost.pid holding the switch's pid: a second switch
    on the same run directory fails here, before it touches any file."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd = -1

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise RunDirError(f"lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"another switch (pid {other}) is running on {self.path.parent}"
                              f" (it holds {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)                # closing drops the lock
            self.fd = -1
