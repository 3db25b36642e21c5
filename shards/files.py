"""File primitives for crash-safe artefacts: content hashes, fsync, atomic replace."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path

# Every temporary name we write carries its writer's PID (``<name>.tmp-<pid>...``,
# ``<name>.old-<pid>...``), so a sweep can tell a live writer's file from a killed
# one's. Older names without a PID are recognised too and judged by age.
TEMP_MARK = ".tmp-"
_TEMP_PID = re.compile(r"\.(?:tmp|old)-(\d+)(?:\.|$)")
_LEGACY_PID_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # db.settings.write_private_file_once before the PID mark
_LEGACY_TEMP = re.compile(r"\.[A-Za-z0-9_]{8}\.(?:tmp|old)$|\.tmp$")  # tempfile names without a PID


def file_stamp(path: str | Path) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime in ns) of a file, or None if there is none: what tells a cached
    copy or a cached load of it from a file written since."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path | str) -> None:
    """Make a rename or link inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a fsynced temporary file and ``os.replace``:
    readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def temp_prefix(name: str) -> str:
    """The prefix of a temporary file or folder for ``name`` written by this process."""
    return f"{name}{TEMP_MARK}{os.getpid()}."


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary names (current or older scheme)."""
    return bool(_TEMP_PID.search(name) or _LEGACY_PID_TEMP.match(name) or _LEGACY_TEMP.search(name))


def temp_writer_pid(name: str) -> int | None:
    """The PID in a temporary name; None for names without one."""
    found = _TEMP_PID.search(name) or _LEGACY_PID_TEMP.match(name)
    return int(found.group(1)) if found else None


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from /proc; None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def writer_alive(pid: int, written_at: float) -> bool:
    """Whether the process ``pid`` that wrote a file at ``written_at`` (mtime) still runs:
    the PID exists and its process started before the file was written (a PID reused by a
    later process is not the writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started = _process_start_time(pid)
    return started is None or started <= written_at + 1.0


def this_host() -> str:
    return socket.gethostname()
