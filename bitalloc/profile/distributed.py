"""Profiling statistics and candidate-table rows on a Ray cluster (the `ray` extra: pip install 'bitalloc[ray]').

One profile's work is split two ways (issue 17):
  statistics  the calibration windows are cut into `workers` contiguous shards in window order; each
              Ray actor holds the model and returns its shard's StatisticSums (Σ x xᵀ, Σ (∂L/∂y)²,
              token-id counts, token counts); the driver adds them in shard order and divides
              (statistics.finish_statistics), whatever order the shards finish in.
  rows        the planned modules, one group per decoder block (and one for the modules outside the
              blocks), go to the actors round-robin with their finished statistics; each returns the
              group's table rows (or the block's signals) and the driver keeps them in module order.
  spikes      the same shards, forward only; per-channel maxima and the top-k tokens merge exactly,
              the float64 moment sums in shard order.
Each actor loads the model from the source the driver loaded (a path or hub id; its content hash must
equal the driver's), or gets the driver's in-memory model through the object store.

Exactness: with one worker the actor does the single-process arithmetic in the same order, so the table
is bit-identical (given the same torch thread count: Ray gives each actor one CPU), and so it is with one
window per shard (the shard order is then the window order). With shards of several windows
the float32 sums associate differently, (w0+…+w3) + (w4+…+w7) instead of w0+…+w7, so H and F differ in
their last bits, and every table cell lies within SHARD_RTOL (relative) of the single-process one.
Failures: an actor whose process dies is restarted by Ray (it reloads the model on its next call) and
the call is retried, up to MAX_RETRIES times; a retried shard computes the same sums.
"""

from __future__ import annotations

import os
import resource
import socket
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator


from ..config import RaySpec
from ..errors import BadInputError, BitallocError, setting
from ..progress import steps

MAX_RETRIES = 2  # restarts of a dead actor, and retries of the call it was running
CPUS_PER_WORKER = 1
# float32 sums of a few thousand windows reassociated: measured ≤ 2e-6 on the tiny test models and
# SmolLM2 (bench/ray_profile.py); the bound leaves room for tables with more windows.
SHARD_RTOL = 1e-4
RAY_EXTRA = "pip install 'bitalloc[ray]'"


def require_ray():
    """The ray module, or BadInputError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise BadInputError(f"{setting('ray')} needs the ray extra: {RAY_EXTRA}") from None
    return ray


def shard_bounds(n_windows: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous window ranges [a, b) in window order whose sizes differ by at most one."""
    return [(k * n_windows // shards, (k + 1) * n_windows // shards) for k in range(shards)]


def add_sums(a, b):
    """StatisticSums a + b, field by field over every ModuleStats field (a new summed field is added too;
    a per-window field, DIVIDE_BY None, is concatenated: a's windows come first)."""
    from .statistics import DIVIDE_BY, ModuleStats, StatisticSums

    if a.modules.keys() != b.modules.keys():
        raise ValueError("shards summed different modules")
    modules = {}
    for name, x in a.modules.items():
        y = b.modules[name]
        modules[name] = ModuleStats(**{f.name: _add(getattr(x, f.name), getattr(y, f.name), name, f.name,
                                                    per_window=DIVIDE_BY[f.name] is None)
                                       for f in fields(ModuleStats)})
    return StatisticSums(modules=modules, n_inputs=a.n_inputs + b.n_inputs, n_predicted=a.n_predicted + b.n_predicted)


def _add(x, y, module: str, signal: str, per_window: bool = False):
    if x is None and y is None:
        return None
    if x is None or y is None:
        raise ValueError(f"{module}: {signal} summed in one shard only")
    if per_window:
        import torch

        return torch.cat([x, y])
    return x + y


class _Worker:
    """One Ray actor: the model (loaded on first use, so a restarted actor reloads it) and the calls on it."""

    def __init__(self, source: str | None, model_ref: list, content_hash: str, trust_remote_code: bool):
        # model_ref: [ObjectRef] of an in-memory model, or []; wrapped in a list so that Ray passes the
        # reference (fetched in _model, again after a restart) instead of resolving it at construction
        self.source, self.model_ref, self.content_hash = source, model_ref, content_hash
        self.model = None
        self.trust_remote_code = trust_remote_code
        self.checked = False

    def _model(self):
        if not self.checked:
            from ..models import load_model, weights_hash

            if self.model_ref:
                import ray

                self.model = ray.get(self.model_ref[0])
            else:
                self.model = load_model(self.source, trust_remote_code=self.trust_remote_code).model
            if weights_hash(self.model) != self.content_hash:
                raise BadInputError(f"the Ray worker on {socket.gethostname()} read other weights from {self.source!r} "
                                    "than the driver (content hashes differ); give every node the same model files")
            self.model.eval()
            self.checked = True
        return self.model

    def sums(self, module_names: list[str], calibration, shard: int, crash_marker: str | None = None):
        model = self._model()
        if crash_marker is not None and shard == 0 and not os.path.exists(crash_marker):
            # tests only: the first attempt of shard 0 dies like a lost node would, once
            open(crash_marker, "w").close()
            os._exit(1)
        from .statistics import statistic_sums

        return statistic_sums(model, module_names, calibration)

    def spikes(self, module_names: list[str], calibration, first_window: int, top_k: int):
        return spike_accumulators(self._model(), module_names, calibration, first_window, top_k)

    def call(self, fn: Callable, names: list[str], stats: dict, kwargs: dict):
        return fn(self._model(), names, stats, **kwargs)

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class RayPool:
    """Ray actors that hold the driver's model, started on first use; close() ends them.

    loaded: the driver's models.LoadedModel: its source is what the actors load (an in-memory
    model travels through the object store instead), its content hash what they must match.
    """

    spec: RaySpec
    loaded: Any
    trust_remote_code: bool = False
    _actors: list = field(default_factory=list, repr=False)
    _model_ref: list = field(default_factory=list, repr=False)  # kept alive for actors that restart

    def start(self) -> list:
        if self._actors:
            return self._actors
        ray = require_ray()
        _connect(ray, self.spec)
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < self.spec.workers * CPUS_PER_WORKER:
            workers = setting("ray.workers")
            raise BadInputError(f"the Ray cluster has {cpus:g} CPU(s); {workers} {self.spec.workers} needs "
                                f"{self.spec.workers * CPUS_PER_WORKER} (one per worker): lower {workers} or add nodes")
        from ..models import LoadedModel

        in_memory = self.loaded.source == LoadedModel.source or "(config only" in self.loaded.source
        self._model_ref = [ray.put(self.loaded.model)] if in_memory else []
        actor = ray.remote(num_cpus=CPUS_PER_WORKER, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)(_Worker)
        self._actors = [actor.remote(None if in_memory else self.loaded.source, self._model_ref,
                                     self.loaded.content_hash, self.trust_remote_code) for _ in range(self.spec.workers)]
        return self._actors

    def statistics(self, module_names: list[str], calibration, *, _crash_marker: str | None = None) -> dict:
        """statistics.collect_statistics(model, module_names, calibration), the windows sharded over the actors."""
        from .statistics import finish_statistics

        n, windows = self.spec.workers, calibration.n_windows
        if n > windows:
            raise BadInputError(f"{setting('ray.workers')} {n} is more than the {windows} calibration window(s), and each worker "
                                f"needs one: use at most {windows} workers or calibrate on more tokens")
        ray, actors = require_ray(), self.start()
        refs = [actors[k].sums.remote(module_names, _windows(calibration, a, b), k, _crash_marker)
                for k, (a, b) in enumerate(shard_bounds(windows, n))]
        total = None
        for k in range(n):  # shard order, so the sum does not depend on which shard finishes first
            part = _get(ray, refs[k])
            refs[k] = None  # frees the shard in the object store
            total = part if total is None else add_sums(total, part)
        return finish_statistics(total)

    def spikes(self, module_names: list[str], calibration, *, top_k: int, threshold: float) -> dict:
        """spikes.collect_spikes(model, module_names, calibration, ...), the windows sharded over the actors.

        Maxima and the top-k tokens merge exactly; the float64 moment sums reassociate (relative ~1e-15)."""
        from .spikes import SpikeCollector

        n, windows = self.spec.workers, calibration.n_windows
        ray, actors = require_ray(), self.start()
        refs = [actors[k].spikes.remote(module_names, _windows(calibration, a, b), a, top_k)
                for k, (a, b) in enumerate(shard_bounds(windows, n))]
        total = None
        for k in range(n):
            part = _get(ray, refs[k])
            refs[k] = None
            total = part if total is None else {m: tuple(merge_sites(x, y) for x, y in zip(total[m], part[m]))
                                                for m in module_names}
        merged = SpikeCollector(module_names, top_k)
        merged.acc = total
        return merged.finish(threshold)  # the same finiteness check and records as collect_spikes

    def map_groups(self, fn: Callable, groups: list[list[str]], stats: dict, **kwargs) -> Iterator:
        """fn(model, names, {n: stats[n]}, **kwargs) for every group of module names, on the actors
        round-robin; yields the results in group order."""
        ray, actors = require_ray(), self.start()
        refs = [actors[i % len(actors)].call.remote(fn, names, {n: stats[n] for n in names}, kwargs)
                for i, names in enumerate(groups)]
        for i in range(len(refs)):
            yield _get(ray, refs[i])
            refs[i] = None

    def peak_rss_mb(self) -> list[float]:
        """Each actor's peak resident memory so far (MB), in actor order."""
        ray = require_ray()
        return [_get(ray, a.peak_rss_mb.remote()) for a in self.start()]

    def close(self) -> None:
        if self._actors:
            ray = require_ray()
            for a in self._actors:
                ray.kill(a)
            self._actors, self._model_ref = [], []


def spike_accumulators(model, module_names: list[str], calibration, first_window: int, top_k: int) -> dict:
    """Per module the (input, output) spikes._SiteAccumulator of these windows, which are windows
    first_window.. of the whole calibration (the top tokens record that index): one shard of collect_spikes."""
    import torch

    from .spikes import SpikeCollector

    collector = SpikeCollector(module_names, top_k)
    with torch.no_grad(), collector.hooked({n: model.get_submodule(n) for n in module_names}):
        for i, window in enumerate(calibration.tokens):
            collector.at(first_window + i)
            model(input_ids=window[None])
    return collector.acc


def merge_sites(a, b):
    """Two shards' _SiteAccumulator of one site as one (a's windows before b's)."""
    import torch

    out = type(a)(a.k)
    out.n = a.n + b.n
    out.moments = a.moments + b.moments
    out.ch_max = torch.maximum(a.ch_max, b.ch_max)
    out.ch_sq = a.ch_sq + b.ch_sq
    # the order collect_spikes keeps, so ties resolve the same way: largest |x|, then earliest window, position
    out.top = sorted(a.top + b.top, key=lambda t: (-t[0], t[1], t[2]))[: a.k]
    return out


def block_groups(model, module_names: list[str]) -> list[list[str]]:
    """module_names cut into runs of the same decoder block (the outside modules form their own runs)."""
    from .interactions import block_index

    groups: list[list[str]] = []
    last = object()
    for n in module_names:
        b = block_index(model, n)
        if b != last:
            groups.append([])
            last = b
        groups[-1].append(n)
    return groups


def ray_candidate_table(pool: RayPool, module_names: list[str], calibration, options, *, quantizer: str = "rtn",
                        progress: bool = False):
    """candidates.build_candidate_table(model, names, collect_statistics(...), options) on the pool's actors."""
    
    from ..candidates import build_candidate_table
    from ..config import supplied_calibration
    from .pipeline import _concat as concat_tables  # the one concatenation of table parts

    stats = pool.statistics(module_names, calibration)
    groups = block_groups(pool.loaded.model, module_names)
    rows = pool.map_groups(build_candidate_table, groups, stats, options=list(options), quantizer=quantizer,
                           supplied=supplied_calibration(calibration))
    return concat_tables(list(steps(rows, "candidate errors (ray)", show=progress, unit="block", total=len(groups))))


def _windows(calibration, a: int, b: int):
    """Windows a..b-1 of a Calibration, without the held-out windows (profiling never reads them)."""
    return replace(calibration, tokens=calibration.tokens[a:b].clone(), held_out=None, held_out_index=())


def _connect(ray, spec: RaySpec) -> None:
    if ray.is_initialized():
        return
    try:
        if spec.address == "auto":  # RAY_ADDRESS or a running local cluster, else start one for this process
            ray.init(include_dashboard=False, logging_level="warning")
        else:
            ray.init(address=spec.address, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot reach the Ray cluster at {spec.address!r} ({first}); start one with "
                            f"`ray start --head` or pass {setting('ray')} auto") from None


def _get(ray, ref):
    """ray.get, with a bitalloc error raised in an actor re-raised as itself (one line at the CLI)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BitallocError):
            raise cause from None
        raise
