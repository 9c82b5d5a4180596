"""Progress of long loops: a tqdm bar on the terminal, and a callback for programs that drive bitalloc.

    with progress.reporting(lambda stage, done, total: print(stage, done, total)):
        api.profile(...)

Every long loop in the library goes through `steps` (or `Bar`, for bars advanced by hand). It shows a
bar when its caller asked for one (`progress=True` in the API, always on the CLI) and tells the
callback that `reporting` installed in the current context: a contextvars.ContextVar, so it follows the
thread or task that installed it and no module global is swapped. The service turns the counts into
job progress (service/work.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

Report = Callable[[str, int, int], None]  # (stage, done, total)
T = TypeVar("T")

_report: ContextVar[Report | None] = ContextVar("bitalloc_progress", default=None)


@contextmanager
def reporting(report: Report) -> Iterator[None]:
    """Within the block, every loop's progress in this context also goes to report(stage, done, total)."""
    token = _report.set(report)
    try:
        yield
    finally:
        _report.reset(token)


class Bar:
    """A bar of `total` steps: shown when `show`, and reported to the context's callback on every update."""

    def __init__(self, total: int, desc: str, *, show: bool, unit: str = "it", initial: int = 0):
        self.total, self.desc, self.done = total, desc, initial
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not show, unit=unit)
        self._report = _report.get()
        self._tell()

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        self._tell()

    def close(self) -> None:
        self._bar.close()

    def _tell(self) -> None:
        if self._report is not None:
            self._report(self.desc, self.done, self.total)


def steps(iterable: Iterable[T], desc: str, *, show: bool, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """The items of `iterable`, counted as a Bar (total: len(iterable) unless given)."""
    bar = Bar(len(iterable) if total is None else total, desc, show=show, unit=unit)  # type: ignore[arg-type]
    try:
        for item in iterable:
            yield item
            bar.update()
    finally:
        bar.close()
