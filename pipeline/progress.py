"""Progress reporting for long steps: silent by default, rich bars on stderr from the CLI."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol


class Step(Protocol):
    def advance(self, amount: int = 1) -> None: ...


class Reporter(Protocol):
    def step(self, description: str, total: int | None) -> AbstractContextManager[Step]: ...


class _SilentStep:
    def advance(self, amount: int = 1) -> None:
        pass

    def __enter__(self) -> _SilentStep:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class SilentReporter:
    def step(self, description: str, total: int | None) -> _SilentStep:
        return _SilentStep()


class _RichStep:
    def __init__(self, progress, task_id) -> None:  # noqa: ANN001
        self._progress, self._task = progress, task_id

    def advance(self, amount: int = 1) -> None:
        self._progress.advance(self._task, amount)

    def __enter__(self) -> _RichStep:
        return self

    def __exit__(self, *exc: object) -> None:
        total = self._progress.tasks[self._task].completed if self._progress.tasks[self._task].total is None else None
        self._progress.update(self._task, total=total, completed=self._progress.tasks[self._task].total or total)


def _rate_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """Items per second over rich's recent window (the mean so far until it has two samples)."""

        def render(self, task) -> Text:  # noqa: ANN001
            speed = task.finished_speed or task.speed or (task.completed / task.elapsed if task.elapsed else None)
            return Text(f"{speed:,.1f}/s" if speed else "", style="progress.data.speed")

    return RateColumn


def _RateColumn():  # noqa: N802 - reads as the column it makes
    return _rate_column_class()()


class RichReporter:
    """Progress bars on stderr (stdout stays clean for --json)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            # Items per second and the time left: embedding a large file takes minutes.
            _RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )

    def __enter__(self) -> RichReporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def step(self, description: str, total: int | None) -> _RichStep:
        return _RichStep(self._progress, self._progress.add_task(description, total=total))
