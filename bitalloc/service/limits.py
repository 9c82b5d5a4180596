"""What one request may cost the service: solver settings under server maxima, and a wall-clock limit per job.

A request names its solver settings (the evolutionary search's `trials`, the ILP's `time_limit_s`, ...);
a value above the server's maximum is refused (400) rather than lowered, so the plan a client gets is the
plan it asked for. Every job runs under `job_timeout_s` from its claim: past that the server marks it
failed with the reason and kills its worker (a fresh one takes its place); a failed job is never re-queued.
A request may ask for a shorter limit of its own (`timeout_s`); one above `job_timeout_s` is refused (400)
naming the cap, for the same reason: a client that asked for an hour should not silently get less.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from ..errors import BadInputError

# Settings that set how long a solver runs, and the most a request may ask for. Defaults of the
# solvers lie well below (evolutionary trials 60, ilp time_limit_s 60, dp max_work 2e9).
SOLVER_MAXIMA: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "evolutionary": MappingProxyType({"trials": 5000, "timeout_s": 1800.0, "population": 256, "radius": 16}),
    "ilp": MappingProxyType({"time_limit_s": 300.0}),
    "dp": MappingProxyType({"max_states": 2e9, "max_work": 2e10}),
    "lagrangian": MappingProxyType({"iterations": 200, "max_rounds": 1024}),
})
DEFAULT_JOB_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class ServiceLimits:
    """job_timeout_s: wall-clock seconds a job may run once a worker claims it.
    solver_maxima: solver -> setting -> the largest value a request may give."""

    job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S
    solver_maxima: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: SOLVER_MAXIMA)

    def __post_init__(self) -> None:
        if not self.job_timeout_s > 0:
            raise BadInputError(f"--job-timeout must be a positive number of seconds, got {self.job_timeout_s}")

    def request_timeout(self, timeout_s: float | None) -> float | None:
        """A request's own job timeout (None: the server's); BadInputError naming the cap when above it."""
        if timeout_s is None:
            return None
        if isinstance(timeout_s, bool) or not 0 < timeout_s <= self.job_timeout_s:  # NaN fails too
            shown = repr(timeout_s) if isinstance(timeout_s, bool) else f"{timeout_s:g}"
            raise BadInputError(f"timeout_s = {shown}: this server runs a job for at most {self.job_timeout_s:g} s "
                                f"(bitalloc serve --job-timeout); ask for a timeout_s above 0 and up to "
                                f"{self.job_timeout_s:g}, or leave it out to get that limit")
        return float(timeout_s)

    def check_solver_settings(self, solver: str, settings: Mapping[str, object]) -> None:
        """BadInputError naming the first setting that is not a number within the server's maximum."""
        maxima = self.solver_maxima.get(solver, {})
        for name in sorted(settings):
            if name not in maxima:
                continue
            value = settings[name]
            if value is None and name == "timeout_s":
                continue  # no search limit of its own: the job timeout still applies
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maxima[name]:
                raise BadInputError(f"solver_settings.{name} = {value!r}: this server allows {solver} {name} from above 0 "
                                    f"up to {maxima[name]:g}; ask for less (jobs also stop after {self.job_timeout_s:g} s)")
