"""``erasure up``: the whole service on one machine, supervised by one process.

Start order (each step waits for the previous one to answer):

1. the database schema to head (once, before anything uses it); a first admin
   token when the database has no live one (printed once, stored as SHA-256);
2. ``prefect server start`` with its home in ``$ERASURE_HOME/prefect-server``
   (its own SQLite database, the UI, the scheduler that runs the sweep);
3. the work pools ``cpu`` and ``gpu`` (process type), then the deployments of
   ``infra/prefect.yaml`` (``prefect deploy --all``: one definition for both
   ``erasure up`` and a hand-made deployment);
4. a ``cpu`` worker, and a ``gpu`` worker when ``torch.cuda.is_available()``;
5. the API (``erasure serve``), which starts the on-demand deployment per request.

Every child runs in its own process group with its output in
``$ERASURE_HOME/up-logs/``. SIGINT (Ctrl-C) and SIGTERM stop them in the reverse
order: SIGTERM to each group, SIGKILL after a grace period, then whatever they
left behind. A worker starts each flow run in a session of its own and stops
them itself on SIGTERM (the end-to-end test stops one mid-run); for a worker
that had to be SIGKILLed, the supervisor is the runs' child subreaper on Linux
and kills every descendant it saw. If a child dies, everything stops and the
exit status is 1. ``up.json`` in the data home (``api/up_state.py``) tells other
commands where the Prefect server is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from api.up_state import pid_alive, prefect_answers, read_state, remove_state, write_state
from db.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"
WORK_POOLS = ("cpu", "gpu")
ADMIN_TOKEN_NAME = "admin"
PREFECT_STARTUP_TIMEOUT_S = 180.0
API_STARTUP_TIMEOUT_S = 90.0
DEPLOY_TIMEOUT_S = 300.0
STOP_GRACE_S = 20.0
PR_SET_CHILD_SUBREAPER = 36


class UpError(Exception):
    """``erasure up`` cannot start: the message says why and what to do."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Stopping(Exception):
    """Raised in the main thread by SIGINT / SIGTERM."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path
    seen_descendants: set[int] = field(default_factory=set)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now (as servers do, past closed connections'
    TIME_WAIT: SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def redacted_url(url: str) -> str:
    """A database URL without its credentials (for the state file and messages)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if "@" in rest else url


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> set[int]:
    parents = _parent_pids()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _become_subreaper() -> None:
    """Orphans of our children reparent to us (not to init), so that stop() can find them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # without it, stop() still kills every descendant it saw


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class LocalService:
    """Starts, watches and stops the children of ``erasure up``."""

    def __init__(self, settings: Settings, api_port: int, prefect_port: int,
                 say: Callable[[str], None], host: str = "127.0.0.1") -> None:
        self.settings, self.api_port, self.prefect_port, self.host = settings, api_port, prefect_port, host
        self.say = say
        self.home = settings.home
        self.log_dir = self.home / "up-logs"
        self.prefect_home = self.home / "prefect-server"
        self.api_url = f"http://{host}:{api_port}"
        self.prefect_url = f"http://{host}:{prefect_port}"
        self.prefect_api_url = f"{self.prefect_url}/api"
        self.children: list[Child] = []
        self.stopping = False
        self.state: dict = {}

    # ------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        def _on_signal(signum: int, _frame: object) -> None:
            if not self.stopping:
                raise Stopping(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)

    # ------------------------------------------------------------ start

    def start(self) -> dict:
        """Start everything; return the state (URLs, ports, pids; the token only if new)."""
        self._refuse_a_second_instance()
        for flag, port in (("--api-port", self.api_port), ("--prefect-port", self.prefect_port)):
            if not port_is_free(port, self.host):
                raise UpError(f"port {port} is in use on {self.host}: choose another with {flag}", code=2)
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.prefect_home.mkdir(exist_ok=True)
        _become_subreaper()

        self.say(f"database {redacted_url(self.settings.resolved_database_url)}: bringing the schema to head")
        admin_token = self._migrate_and_admin_token()

        self.say(f"starting the Prefect server on {self.prefect_url} (home {self.prefect_home})")
        self._spawn("prefect-server", [sys.executable, "-m", "prefect", "server", "start", "--host", self.host,
                                       "--port", str(self.prefect_port)], self._prefect_server_env())
        self._wait_until("prefect-server", lambda: prefect_answers(self.prefect_api_url, 1.0),
                         PREFECT_STARTUP_TIMEOUT_S)

        self.say("creating the work pools and deploying the flows (infra/prefect.yaml)")
        os.environ["PREFECT_API_URL"] = self.prefect_api_url  # before this process imports prefect
        self._create_work_pools()
        self._deploy()

        gpu = cuda_available()
        self._spawn("worker-cpu", self._worker_command("cpu"), self._client_env())
        if gpu:
            self._spawn("worker-gpu", self._worker_command("gpu"), self._client_env())
        self._spawn("api", [sys.executable, "-m", "api.cli", "serve", "--host", self.host, "--port",
                            str(self.api_port), "--log-level", "warning"], self._client_env())
        self._wait_until("api", self._api_answers, API_STARTUP_TIMEOUT_S)

        self.state = {
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "home": str(self.home),
            "database": redacted_url(self.settings.resolved_database_url),
            "api_url": self.api_url,
            "api_docs_url": f"{self.api_url}/docs",
            "console_url": f"{self.api_url}/console" if self._has_console() else None,
            "prefect_api_url": self.prefect_api_url,
            "prefect_ui_url": self.prefect_url,
            "ports": {"api": self.api_port, "prefect": self.prefect_port},
            "workers": ["cpu", "gpu"] if gpu else ["cpu"],
            "children": {child.name: child.process.pid for child in self.children},
            "logs": str(self.log_dir),
        }
        write_state(self.home, self.state)
        return {**self.state, "admin_token": admin_token}

    def _refuse_a_second_instance(self) -> None:
        state = read_state(self.home)
        if not state or not isinstance(state.get("pid"), int):
            return
        if pid_alive(state["pid"]) and state["pid"] != os.getpid():
            raise UpError(f"erasure up is already running for {self.home} (pid {state['pid']}; API "
                          f"{state.get('api_url')}, Prefect {state.get('prefect_ui_url')}); stop it with Ctrl-C "
                          f"or `kill -TERM {state['pid']}`", code=2)
        # A supervisor that died without stopping its children (SIGKILL): stop what is left of them.
        for name, pid in (state.get("children") or {}).items():
            if isinstance(pid, int) and pid_alive(pid) and self._is_ours(pid):
                self.say(f"stopping {name} (pid {pid}) left by an earlier erasure up that did not stop cleanly")
                self._kill_group(pid, signal.SIGKILL)
        remove_state(self.home, state["pid"])

    @staticmethod
    def _is_ours(pid: int) -> bool:
        """Guards against a reused pid: the process must be a Python running prefect or our CLI."""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return b"prefect" in command or b"api.cli" in command

    def _migrate_and_admin_token(self) -> str | None:
        from db.requests import issue_token, list_tokens
        from db.session import make_engine, unit_of_work, upgrade_to_head

        url = self.settings.resolved_database_url
        try:
            upgrade_to_head(url)
        except Exception as exc:  # noqa: BLE001 - any driver error: reported with the fix, nothing started yet
            raise UpError(f"cannot bring the database {redacted_url(url)} to the current schema: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                          "(check ERASURE_DATABASE_URL / --database-url)", code=2) from exc
        engine = make_engine(url)
        try:
            with unit_of_work(engine) as session:
                tokens = list_tokens(session)
                if any(t.revoked_at is None and "admin" in t.scope_set for t in tokens):
                    return None
                names = {t.name for t in tokens}
                name = next(n for n in (ADMIN_TOKEN_NAME, *(f"{ADMIN_TOKEN_NAME}-{i}" for i in range(2, 10_000)))
                            if n not in names)
                token, _ = issue_token(session, name, ["admin"])
                return token
        finally:
            engine.dispose()

    def _prefect_server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(PREFECT_HOME=str(self.prefect_home), PREFECT_SERVER_UI_ENABLED="true", PREFECT_UI_ENABLED="true",
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
        return env

    def _client_env(self) -> dict[str, str]:
        """Workers, the flow runs they start, the deployer and the API: our settings and the server."""
        env = dict(os.environ)
        env.update(
            PREFECT_API_URL=self.prefect_api_url,
            PREFECT_HOME=str(self.prefect_home),
            ERASURE_HOME=str(self.home),
            ERASURE_DATABASE_URL=self.settings.resolved_database_url,
            ERASURE_CODE_DIR=str(ROOT),  # the deployments' pull step: run the flows from this checkout
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        # A local server is cheap to poll: runs start within a couple of seconds, not ten.
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        return env

    def _worker_command(self, pool: str) -> list[str]:
        return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                "--name", f"erasure-up-{pool}-{os.getpid()}"]

    def _create_work_pools(self) -> None:
        import flows.prefect_setup  # noqa: F401  (our Prefect defaults, before prefect is imported)

        from prefect import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.exceptions import ObjectAlreadyExists
        from prefect.workers.process import ProcessWorker

        template = ProcessWorker.get_default_base_job_template()
        with get_client(sync_client=True) as client:
            for pool in WORK_POOLS:
                try:
                    client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
                except ObjectAlreadyExists:
                    pass

    def _deploy(self) -> None:
        log = self.log_dir / "deploy.log"
        with open(log, "wb") as out:
            try:
                done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all",
                                       "--prefect-file", str(PREFECT_YAML)], cwd=ROOT, env=self._client_env(),
                                      stdout=out, stderr=subprocess.STDOUT, timeout=DEPLOY_TIMEOUT_S)
            except subprocess.TimeoutExpired as exc:
                raise UpError(f"prefect deploy did not finish within {DEPLOY_TIMEOUT_S:.0f} s (log: {log})") from exc
        if done.returncode != 0:
            raise UpError(f"prefect deploy failed with status {done.returncode}: {_tail(log)}\n(log: {log})")

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def _wait_until(self, name: str, ready: Callable[[], bool], timeout_s: float) -> None:
        child = next(c for c in self.children if c.name == name)
        deadline = time.monotonic() + timeout_s
        while not ready():
            if child.process.poll() is not None:
                raise UpError(f"{name} exited with status {child.process.returncode} while starting: "
                              f"{_tail(child.log)}\n(log: {child.log})")
            if time.monotonic() > deadline:
                raise UpError(f"{name} did not answer within {timeout_s:.0f} s (log: {child.log})")
            time.sleep(0.25)

    def _api_answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.api_url}/openapi.json", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def _has_console(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.api_url}/console", timeout=5).status_code != 404
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------ run and stop

    def watch(self, poll_s: float = 1.0) -> int:
        """Block until a signal (status 0) or until a child exits (status 1, everything stops)."""
        while True:
            for child in self.children:
                if child.process.poll() is not None:
                    self.say(f"{child.name} exited with status {child.process.returncode}; stopping everything "
                             f"(log: {child.log})\n{_tail(child.log)}")
                    return 1
                child.seen_descendants |= descendants(child.process.pid)
            time.sleep(poll_s)

    def stop(self) -> None:
        """Stop every child (reverse start order) and everything they started; remove the state file."""
        self.stopping = True
        for child in self.children:
            child.seen_descendants |= descendants(child.process.pid)
        for child in reversed(self.children):
            if child.process.poll() is None:
                self._kill_group(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop within {STOP_GRACE_S:.0f} s: killing it")
            self._kill_group(child.process.pid, signal.SIGKILL)  # anything left in its group
            if child.process.poll() is None:
                child.process.wait(timeout=10)
        leftovers = {pid for child in self.children for pid in child.seen_descendants} | descendants(os.getpid())
        self._stop_pids(leftovers)
        remove_state(self.home, os.getpid())

    def _stop_pids(self, pids: set[int]) -> None:
        """SIGTERM, then SIGKILL after a grace period; reaps those that became our children."""
        alive = {pid for pid in pids if pid_alive(pid)}
        for pid in alive:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while alive and time.monotonic() < deadline:
            _reap()
            alive = {pid for pid in alive if pid_alive(pid) and not _is_zombie(pid)}
            time.sleep(0.1)
        for pid in alive:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
        _reap()

    @staticmethod
    def _kill_group(pid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] == "Z"


def _reap() -> None:
    """Collect exited children (including orphans adopted as subreaper) so no zombie stays."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _tail(log: Path, chars: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
