"""Hosts for multi-host tests, built on this machine with Linux network namespaces.

Host A is the root namespace on the address of a bridge of its own (``10.213.N.1/24``,
N picked free per run); hosts B, C, ... are namespaces (``ip netns add``), each with a
veth pair into that bridge (``10.213.N.2``, ``.3``, ...) and its own loopback: from
them only A's and each other's addresses answer (no route elsewhere, and A's loopback
services, e.g. the suite's shared PostgreSQL, are unreachable). A process started on
a namespace host also gets its own mount namespace (``ip netns exec`` makes one) in
which the folders named ``hidden`` are covered by empty tmpfs mounts: a worker there
cannot read A's files even by an absolute path that a database row might name.

Everything carries a per-run name (``mh<hex>``) and is removed by ``close()``, which
a fixture calls in its finalizer, on failure too: processes (every pid in each
namespace, SIGKILL), namespaces, veths and the bridge.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUBNET_PREFIX = "10.213"


def netns_unavailable_reason() -> str | None:
    """Why namespace hosts cannot be built here (None when they can)."""
    if os.geteuid() != 0:
        return "building hosts as network namespaces needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if shutil.which("unshare") is None:
        return "util-linux's `unshare` is not installed"
    probe = f"mhprobe{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


def _subnet_in_use(third: int) -> bool:
    shown = subprocess.run(["ip", "-4", "addr", "show"], capture_output=True, text=True).stdout
    return f" {SUBNET_PREFIX}.{third}." in shown


@dataclass
class Host:
    name: str
    address: str
    netns: str | None  # None: host A, the root namespace
    hidden: tuple[Path, ...] = ()
    processes: list[subprocess.Popen] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host: inside its namespaces, with the hidden folders covered."""
        if self.netns is None:
            return argv
        steps = [f"hostname {self.hostname}",
                 *(f"mount -t tmpfs -o size=1m,mode=0555 hidden {h}" for h in self.hidden), 'exec "$@"']
        # unshare: a private mount namespace (no mount leaks back to A) and a host name of its own
        return ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", " && ".join(steps), "sh", *argv]

    @property
    def hostname(self) -> str:
        return f"host-{self.name.lower()}"

    def start(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            process = subprocess.Popen(self.command(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        """Every process in this host's network namespace (what a power cut would end)."""
        if self.netns is None:
            return [p.pid for p in self.processes if p.poll() is None]
        shown = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(pid) for pid in shown.split()]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process of this host (kill -9 of its worker and the runs it started)."""
        killed = []
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.processes = [p for p in self.processes if p.poll() is None]
        return killed

    def stop(self) -> None:
        """SIGTERM each started process group, SIGKILL after a grace period, then anything left."""
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=20)
        if self.netns is not None:
            self.kill_everything()


class Network:
    """A bridge on host A and one namespace per other host; ``close()`` removes all of it."""

    def __init__(self) -> None:
        self.tag = f"mh{uuid.uuid4().hex[:6]}"
        free = [n for n in range(1, 255) if not _subnet_in_use(n)]
        if not free:
            raise RuntimeError(f"no free {SUBNET_PREFIX}.N.0/24 subnet")
        self.third = random.choice(free)
        self.bridge = f"{self.tag}br"
        self.hosts: list[Host] = []
        self.veths: list[str] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        try:
            _ip("addr", "add", f"{SUBNET_PREFIX}.{self.third}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except Exception:
            self.close()
            raise
        self.a = Host("A", f"{SUBNET_PREFIX}.{self.third}.1", None)

    def add_host(self, name: str, hidden: tuple[Path, ...] = ()) -> Host:
        netns = f"{self.tag}{name.lower()}"
        address = f"{SUBNET_PREFIX}.{self.third}.{len(self.hosts) + 2}"
        outside, inside = f"{netns}o", f"{netns}i"
        _ip("netns", "add", netns)
        host = Host(name, address, netns, tuple(hidden))
        self.hosts.append(host)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self.veths.append(outside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("addr", "add", f"{address}/24", "dev", inside, netns=netns)
        _ip("link", "set", inside, "up", netns=netns)
        _ip("link", "set", "lo", "up", netns=netns)
        return host

    def close(self) -> None:
        errors = []
        for host in [*self.hosts, *([self.a] if hasattr(self, "a") else [])]:
            try:
                host.stop()
            except Exception as exc:  # noqa: BLE001 - go on removing the rest; reported below
                errors.append(f"stopping {host.name}: {exc}")
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        for veth in self.veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)  # gone with its namespace already
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        if self.tag in left:
            errors.append(f"namespaces left behind: {left}")
        if errors:
            raise RuntimeError("; ".join(errors))
