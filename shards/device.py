"""Where sub-models train, and the switches that make training reproducible.

Device choice: an explicit ``device=`` argument wins, then the ``ERASURE_DEVICE``
environment variable (``cpu``, ``cuda``, ``cuda:1``), then CUDA when available,
else the CPU. Asking for CUDA on a machine without it is an error, not a silent
fallback, because a certificate names the device that did the work.

Deterministic mode (``deterministic_mode``), what it guarantees and where:

* CPU: ``torch.use_deterministic_algorithms(True)`` and a fixed thread count.
  Two runs with the same torch build, thread count and inputs give bitwise
  identical weights; this is what the exactness certificate rests on.
* CUDA: additionally ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (must be set before the
  first cuBLAS call, so set it in the worker's environment to be safe),
  cuDNN deterministic and not benchmarking, TF32 off. Runs are then bitwise
  reproducible on the same GPU model, driver and torch build, but are not equal
  to CPU runs: retrain on the kind of device that trained the checkpoints
  (``Runtime.matches`` checks the recorded environment).

Randomness never comes from ambient global state: every random draw in training
uses a generator seeded from (seed, shard, slice, epoch); see ``shards.training``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

DEVICE_ENV = "ERASURE_DEVICE"
THREADS_ENV = "ERASURE_TORCH_THREADS"
CUBLAS_WORKSPACE = ":4096:8"


def choose_device(override: str | torch.device | None = None) -> torch.device:
    """The device to train on: ``override``, else ``$ERASURE_DEVICE``, else CUDA if present, else CPU."""
    wanted = override if override is not None else os.environ.get(DEVICE_ENV) or None
    if wanted is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(wanted)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {wanted!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {wanted!r} requested but CUDA is not available; set {DEVICE_ENV}=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{wanted!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda'")
    return device


def choose_threads(override: int | None = None) -> int:
    """CPU threads for training: ``override``, else ``$ERASURE_TORCH_THREADS``, else torch's current setting."""
    if override is None:
        env = os.environ.get(THREADS_ENV)
        override = int(env) if env else torch.get_num_threads()
    if override < 1:
        raise ValueError(f"threads must be at least 1, got {override}")
    return override


@dataclass(frozen=True)
class Runtime:
    """The environment a training ran in; recorded in every checkpoint."""

    device: str
    threads: int
    torch_version: str
    deterministic: bool = True

    @property
    def device_kind(self) -> str:
        return torch.device(self.device).type

    def differences(self, other: Runtime) -> tuple[str, ...]:
        """The recorded fields in which a run here cannot reproduce a run in ``other`` bit for bit:
        ``device`` (kind), ``torch_version``, ``threads`` (on the CPU) and ``deterministic``."""
        kind = self.device_kind
        differ = []
        if kind != other.device_kind:
            differ.append("device")
        if self.torch_version != other.torch_version:
            differ.append("torch_version")
        if kind == "cpu" and other.device_kind == "cpu" and self.threads != other.threads:
            differ.append("threads")
        if not (self.deterministic and other.deterministic):
            differ.append("deterministic")
        return tuple(differ)

    def matches(self, other: Runtime) -> bool:
        """True when a run here reproduces a run in ``other`` bit for bit (same device type and build,
        and on the CPU the same thread count)."""
        return not self.differences(other)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "threads": self.threads,
            "torch_version": self.torch_version,
            "deterministic": self.deterministic,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Runtime:
        return cls(str(data["device"]), int(data["threads"]), str(data["torch_version"]), bool(data["deterministic"]))


def resolve_runtime(device: str | torch.device | None = None, threads: int | None = None) -> Runtime:
    return Runtime(
        device=str(choose_device(device)), threads=choose_threads(threads), torch_version=str(torch.__version__)
    )


@contextmanager
def deterministic_mode(runtime: Runtime) -> Iterator[torch.device]:
    """Switch torch into deterministic mode for ``runtime`` and restore the previous switches afterwards.

    These switches are process-wide: do not train two sub-models in threads of
    one process; use processes (a retraining is a self-contained unit of work).
    """
    device = torch.device(runtime.device)
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(runtime.deterministic)
    torch.set_num_threads(runtime.threads)
    try:
        yield device
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.set_num_threads(saved[2])
        torch.backends.cudnn.deterministic = saved[3]
        torch.backends.cudnn.benchmark = saved[4]
        torch.backends.cuda.matmul.allow_tf32 = saved[5]
        torch.backends.cudnn.allow_tf32 = saved[6]
