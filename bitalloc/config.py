"""The settings of the two pipeline steps as frozen, validated objects; their defaults live here only.

ProfileConfig: what a candidate table is measured with (calibration windows, option grid, planned
modules, quantizer, streaming). Every entry point that profiles (api.plan/prepare/profile_model,
sweep.pareto, the CLI, the service, qat.replan) builds one and hands it on whole, so no setting can
be dropped on the way (issue 12: the quantizer was lost on four paths).
SolveConfig: how a plan is chosen from a table (budget, solver + settings, error model,
constraints, latency target, seed).
ProfileSettings: how each signal of a profile folder is measured; VerifySettings: how a plan is
checked against measured loss. The CLI's flags take their defaults from these classes.

Both import neither torch nor transformers: the CLI builds them before any model is loaded, and
re-planning from a saved profile stays numpy-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .budget import Budget, parse_budget
from .constraints import Constraints
from .errors import BadInputError, setting
from .options import QuantOption, default_options, parse_option
from .table import ERROR_MODELS


@dataclass(frozen=True)
class CalibrationSpec:
    """Which calibration windows a profile is measured on.

    source: a text file path, token ids [windows, seq_len] or a calibration.Calibration (the latter
    two are used as they are: seq_len and tokens then only describe text sources).
    tokens: calibration tokens drawn as random windows of seq_len; seed: which windows.
    """

    source: Any = None
    seq_len: int = 512
    tokens: int = 8192
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.source, (str, Path, type(None))) and (self.seq_len < 2 or self.tokens < self.seq_len):
            raise BadInputError(f"need calibration seq_len >= 2 and tokens >= seq_len, got {self.seq_len} and {self.tokens}")


@dataclass(frozen=True)
class RaySpec:
    """Where profiling statistics run when they are spread over a Ray cluster (profile/distributed.py).

    address: "auto" = the cluster $RAY_ADDRESS names or one running on this machine, else a local one
    started for the run; otherwise a cluster address (host:port, ray://host:port).
    workers: Ray actors; each holds the model and gets a contiguous share of the calibration windows.
    """

    address: str = "auto"
    workers: int = 2

    def __post_init__(self):
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise BadInputError(f"{setting('ray.workers')} must be a whole number of at least 1, got {self.workers!r}")
        if not isinstance(self.address, str) or not self.address.strip():
            raise BadInputError(f"{setting('ray')} needs 'auto' or a cluster address (host:port or ray://host:port)")


def _default_grid() -> tuple[QuantOption, ...]:
    return tuple(default_options())


# The quantizer of every grid that holds anything but GGUF types, and every grid's error model.
DEFAULT_QUANTIZER = "awq-gptq"
# The default where no scales can be folded into the model (default_quantizer's foldable).
DEFAULT_UNFOLDED_QUANTIZER = "rtn-w"
DEFAULT_ERROR_MODEL = "fisher-tw"
# The one quantizer profile keys leave out: it was the only one before the quantizer was a setting, so
# keys made then keep their ids.
KEYLESS_QUANTIZER = "rtn"


def gguf_only(options) -> bool:
    """Whether a grid holds llama.cpp's GGUF types and nothing else besides kept fp16."""
    fmts = {o.fmt for o in options}
    return "gguf" in fmts and fmts <= {"gguf", "keep"}


def supplied_calibration(source: Any) -> bool:
    """Whether calibration `source` (CalibrationSpec.source, or a calibration.Calibration) is the user's own data,
    a text file or token ids, rather than the set bitalloc ships (None, "builtin:NAME") or the model's own text
    ("self")."""
    name = getattr(source, "source", source)  # a Calibration records where its windows came from
    if name is None:
        return False
    return not (isinstance(name, str) and (name == "self" or name.startswith("builtin:")))


# GPTQ's Hessians, when a plan calibrated on text the user supplied or on the built-in set is applied, come from this
# many times the profile's calibration tokens of that text (apply.plan_quantizer_settings; as many as it holds):
# 131072 tokens for the default 8192, half the reference GPTQ's 128 x 2048. 4x (32768 tokens, damp 1 %) lowered KL to
# the float model by 8-17 % at all eight sizes measured on SmolLM2 and 14-15 % at all three on Gemma 3; 16x, with damp
# 5 % and the float target, lowered perplexity and KL again against 4x in all six paired rows measured, on two
# calibration seeds and both families (docs/results.md, *GPTQ's Hessians from more of the text*). Applying takes about
# 2.3 to 3.5 times as long as at 4x; the candidate table and the fold keep the profile's windows, so profiling costs
# what it did. On the built-in set (88064 tokens of SmolLM2's tokenizer: all of it) the 4.3125-bit default plan's KL
# fell 11 % on SmolLM2 and 6 % on Gemma 3 against the profile's windows alone, for 5 to 6 times the apply time;
# uniform int4-g64-asym's about 9 % on both, so the plan's lead over it grew on SmolLM2 (-9.4 to -11.4 % KL) and
# became level on Gemma 3 (-2.1 to +0.4 %, within noise; docs/results.md, *More of the built-in set for GPTQ's
# Hessians*).
HESSIAN_TEXT_MULTIPLE = 16
# And GPTQ, on the built-in set and `self`, fits each layer a quarter of the way from its own weight toward the one
# that best gives the float model's output on the quantized model's inputs (quantize_model's float_target; GPTAQ's
# asymmetric calibration, whose published code uses this 0.25), so later layers undo part of the error earlier ones
# left. On WikiText-2 calibration (32768 tokens, damp 5 %) it lowered KL to the float model at all eight sizes
# measured on SmolLM2 (3.2 to 5.53 bits; -7 to -18 %) and all three on Gemma 3 (-9 to -14 %), and perplexity at ten
# of the eleven; all of the way (1.0) did not help at 3.5 bits, halfway (0.5) was level there. On the built-in set
# it lowered both at 3.2 to 4.44 bits on SmolLM2 and at 3.5 on Gemma 3 against GPTQ's own target (docs/results.md, *GPTQ
# fits toward the float model*, *The built-in set too*).
FLOAT_TARGET = 0.25
# Halfway where GPTQ's Hessians come from HESSIAN_TEXT_MULTIPLE times the text the user supplied. With 16x Hessians
# it scored lower perplexity than a quarter at 3.5 and 4.0 bits on SmolLM2, two calibration seeds each (-0.06 to
# -0.46), KL from +0.7 % to -7 %, and on Gemma 3 at 3.5 bits level perplexity and 3.5 % lower KL; with 4x, halfway
# had lost 0.36 at 3.5 bits (our reading: fitted on less text, the stronger pull follows the calibration windows'
# drift). The built-in set keeps a quarter: with its Hessians from the profile's windows alone, halfway lost there at
# 3.5 bits on SmolLM2 (+3.7 ppl, +9 % KL) and was level at 4.0 (docs/results.md, *GPTQ fits toward the float model*);
# with the wider Hessians it has since, halfway is measured only together with token weighting (TOKEN_WEIGHTED_ON_TEXT
# below).
FLOAT_TARGET_WIDENED = 0.5
# And there each layer weighs every calibration token by its output's loss gradient (quantizers/sequential.py,
# token_weighted), so GPTQ minimises the loss increase the plan's error model (fisher-tw) predicts rather than the
# plain output error, which the attention sink's massive, gradient-free activations dominate. With 16x Hessians,
# halfway, it lowered KL to the float model in every paired row measured: plans on SmolLM2 at 4.0 bits at three
# calibration seeds (-2, -8, -9 %) and at 4.3125 (-5 %), on Gemma 3 at 4.125 and 4.3125 (-5 % each), and uniform
# int4-g64-asym at 4.3125 (SmolLM2 -5 %, Gemma 3 -2 %); perplexity lower or level in each. So the plan's standing
# against uniform moved little: level with it on SmolLM2, and on Gemma 3, at the seed where the plan lost, the loss
# narrowed from +7 % KL to +4 % (docs/results.md, *GPTQ weighted by each token's loss gradient*). The price is one
# forward and backward pass of the float model over the Hessian windows: a bench row (apply and score) took 1.03 to
# 1.67 times as long on SmolLM2 and 1.46 to 2.4 on Gemma 3 (its 262144-token vocabulary), beside other jobs. The
# built-in set weighs every token alike: with its Hessians from the profile's windows alone (a quarter of the way)
# token weighting raised the plan's KL by 2.4 % on SmolLM2 at 4.3125 bits (uniform's level) and left Gemma 3's plan
# level, where the weights of k_proj and v_proj rest on a few dozen attention-sink tokens (bench/token_weights.py).
# With its Hessians from all of the set, halfway, it lowered the plan's KL by 4.4 % on SmolLM2 and 3.4 % on Gemma 3,
# but uniform int4-g64-asym's on Gemma 3 by 5.9 %, leaving the plan 3 % behind uniform there: so the built-in set
# keeps a quarter and every token alike (docs/results.md, *More of the built-in set for GPTQ's Hessians*).
TOKEN_WEIGHTED_ON_TEXT = True


def quantizer_settings(quantizer: str, supplied: bool) -> dict[str, Any]:
    """The settings `quantizer` runs with where its Hessians come from text the user supplied (supplied_calibration)
    or, supplied False, from the built-in set or the model's own text; the profile's table and apply agree.

    A column-ordering quantizer (gptq, gptq-signed, awq-gptq) visits columns in act-order on supplied text, taken as
    the text the model will serve, and in natural order otherwise. Act-order leans harder on the calibration's
    Hessian: calibrated on WikiText-2 validation it gained on WikiText-2 test at 3.2 bits on SmolLM2 and 3.5 on
    Gemma 3, and calibrated on the built-in set it lost to natural order at every size measured on both
    (+0.9 to +4.5 ppl, +4 to +20 % KL; docs/results.md, *Why GPTQ was first kept to calibration you supply*)."""
    from .quantizers import orders_columns

    return {"act_order": supplied} if orders_columns(quantizer) else {}


def default_quantizer(options, foldable: bool = True) -> str:
    """The quantizer a grid is profiled and applied with when none is named.

    A grid of llama.cpp's GGUF types gets `imatrix`: llama.cpp's own quantizers with the importance weights
    llama-imatrix would collect, here diag H from the profile's calibration pass, which every profile runs
    anyway. That is what llama.cpp users quantize with, and its mixes made so beat those made without at
    every size (bench/peers.py). Other grids get awq-gptq: AWQ's activation-aware scales folded into the model
    (equalize.py), then GPTQ block by block, each layer fitted part of the way toward the float model's output
    (FLOAT_TARGET, FLOAT_TARGET_WIDENED). Its table holds awq's errors (awq: the same fold, then rtn-w, RTN with importance-weighted
    scales; quantizers.measuring_quantizer), so it profiles in awq's time; applying costs more. awq's INT plans have
    lower KL than rtn-w's at every measured size on SmolLM2 (7 sizes, 3.2 to 5.53 bits) and Gemma 3 (8), and are
    below llama.cpp's imatrix mixes in ppl at all five of their sizes on SmolLM2 (docs/results.md, *Equalization*). Applied
    with awq-gptq the same plans score lower still: on WikiText-2 calibration in KL at every measured size of both
    families, and on the built-in set (other text than the test's) at 3.2 to 4.44 bits by 2 to 12 % in ppl and 5 to
    19 % in KL on SmolLM2 (level at 5.28 bits) and at 3.5 and 4.46 bits by 9 and 3 % in ppl and 17 and 18 % in KL
    on Gemma 3 (docs/results.md, *The built-in set too*).
    A model without Llama-family blocks (GPT-2, OPT, BERT) has nothing to fold: awq-gptq is gptq there.
    foldable: False where no scales can be folded into the model profiled (--stream and --ray never hold it
    whole; api.profile of a model not equalized first measures it as it is): rtn-w there.
    Applying an awq, awq-gptq or rtn-w plan needs its calibration windows again: a plan made in this process carries
    them (Plan.calibration_windows), a saved one rebuilds them with a tokenizer.
    """
    if gguf_only(options):
        return "imatrix"
    if not foldable:
        return DEFAULT_UNFOLDED_QUANTIZER
    return DEFAULT_QUANTIZER


def default_error_model(options) -> str:
    """The error model a table of these options is solved under when none is named: fisher-tw for every grid.

    On a grid of GGUF types its llama.cpp-type plans are below llama.cpp's own imatrix mixes at every mix size
    on SmolLM2 and the tiny Qwen2, where fisher's lose at SmolLM2's Q3_K_S size (bench/gguf_roundtrip.py,
    bench/peers.py). On INT grids fisher's rtn-w plans measure worse than a uniform rtn-w option that fits at
    five of Gemma 3's six mix sizes, and fisher-tw's beat every such option at all six; on SmolLM2 its rtn-w
    plans have lower KL at all five mix sizes and lower ppl at four (bench/plan_variants.py; README, *How the
    loss is predicted*). `options` is kept so that a grid can get its own default again.
    """
    return DEFAULT_ERROR_MODEL


@dataclass(frozen=True)
class ProfileConfig:
    """Everything the candidate table depends on besides the model's weights.

    options: the candidate grid (default options.default_options()). include_lm_head /
    include_embeddings: plan the output head / input embedding too. quantizer: whose ΔW the
    candidate errors measure, i.e. the quantizer the plan will be applied with (rtn, rtn-mse, gptq);
    None: default_quantizer (imatrix for a grid of GGUF types, else awq, or awq-gptq on calibration text or ids
    the user supplies; rtn-w with stream or ray).
    stream: profile one decoder block at a time from a local checkpoint (same table).
    ray: spread statistics and table rows over a Ray cluster (same table: bit-identical with one
    worker, float32 summation order otherwise; profile/distributed.py).
    """

    calibration: CalibrationSpec = CalibrationSpec()
    options: tuple[QuantOption, ...] = field(default_factory=_default_grid)
    include_lm_head: bool = False
    include_embeddings: bool = False
    quantizer: str | None = None
    stream: bool = False
    ray: RaySpec | None = None

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))
        if self.ray is not None and self.stream:
            raise BadInputError(f"{setting('ray')} workers hold the whole model, {setting('stream')} never does: drop one of them")
        if not self.options:
            raise BadInputError("no candidate options to profile; offer at least one (e.g. default_options())")
        if not all(isinstance(o, QuantOption) for o in self.options):
            raise BadInputError("options must be QuantOption objects (see bitalloc.default_options)")
        if self.quantizer is None:
            object.__setattr__(self, "quantizer", default_quantizer(self.options, foldable=not self.stream and self.ray is None))
        check_quantizer(self.quantizer)


@dataclass(frozen=True)
class SolveConfig:
    """How a plan is chosen from a candidate table.

    budget: '3.2bits', '1.5GB', '30%' or a Budget. solver_settings: passed to the solver (e.g.
    backend, time_limit_s). latency_target: a latency.planning.LatencyTarget (predict and cap the
    latency). score_windows: calibration windows a scoring solver (evolutionary) measures on.
    error_model: None = default_error_model(the table's options), chosen when the table is solved.
    """

    budget: Budget | str
    solver: str = "ilp"
    solver_settings: tuple[tuple[str, Any], ...] = ()
    error_model: str | None = None
    constraints: Constraints = Constraints()
    latency_target: Any = None
    seed: int = 0
    score_windows: int = 4

    def __post_init__(self):
        object.__setattr__(self, "budget", parse_budget(self.budget))
        settings = self.solver_settings.items() if isinstance(self.solver_settings, dict) else self.solver_settings
        object.__setattr__(self, "solver_settings", tuple(sorted((str(k), v) for k, v in settings)))
        check_solver_names(self.solver, self.error_model)
        if self.constraints is None:
            object.__setattr__(self, "constraints", Constraints())

    def solve_kwargs(self) -> dict:
        """The keyword arguments of api.solve_table / plan_from_table (everything but the budget)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "budget"}
        kw["solver_settings"] = dict(self.solver_settings)
        return kw


def check_solver_names(solver: str, error_model: str | None) -> None:
    """BadInputError unless `solver` is registered and `error_model` is one a table carries (or None:
    the table's default)."""
    from . import solvers

    if error_model is not None and error_model not in ERROR_MODELS:
        raise BadInputError(f"unknown error model {error_model!r}; choose one of {', '.join(ERROR_MODELS)}")
    if solver not in solvers.available_solvers():
        raise BadInputError(f"unknown solver {solver!r}; available: {', '.join(solvers.available_solvers())}")


def check_quantizer(name: str) -> None:
    """BadInputError unless `name` is a registered quantizer (imports the quantizers, hence torch)."""
    from .quantizers import available_quantizers

    if name not in available_quantizers():
        raise BadInputError(f"unknown quantizer {name!r}; choose one of {', '.join(available_quantizers())}")


def check_table_quantizer(table_quantizer: str, wanted: str | None, where: str, fix: str) -> None:
    """Refuse to plan for quantizer `wanted` from a table whose errors are `table_quantizer`'s.

    The errors a table holds are those of one quantizer's ΔW; a plan solved on RTN errors and applied
    with GPTQ would be chosen for the wrong errors, so a mismatch is an error, never a silent switch.
    wanted None: use the table's quantizer.
    """
    if wanted is not None and wanted != table_quantizer:
        raise BadInputError(f"{where} holds {table_quantizer} errors, not {wanted}; {fix}")


# ---- what a profile measures (profile/pipeline.py computes it) ---------------------------------------

SIGNALS = ("fisher", "trace", "salience", "spikes", "interactions", "table")
DEFAULT_SIGNALS = ("fisher", "trace", "salience", "spikes", "table")
# "hutchinson": tr ∇²_W L by Hessian-vector products (whole model); "empirical-fisher": the streamed
# stand-in of profile/fisher_trace.py. Recorded in the profile's settings (and key).
HUTCHINSON, EMPIRICAL_FISHER = "hutchinson", "empirical-fisher"
TRACE_ESTIMATORS = (HUTCHINSON, EMPIRICAL_FISHER)
SPIKE_THRESHOLD = 300.0  # max|x| / median channel RMS above which a projection is flagged (profile/spikes.py)


@dataclass(frozen=True)
class ProfileSettings:
    """How each signal of a profile folder is measured (part of its key)."""

    signals: tuple[str, ...] = DEFAULT_SIGNALS
    trace_tol: float = 0.1  # a weight stops when its trace's relative standard error is below this
    trace_abs_tol: float = 0.01  # ... or its standard error is below this fraction of the largest |trace|
    trace_min_probes: int = 8
    trace_max_probes: int = 64
    trace_windows: int | None = 4  # calibration windows the probes cycle over (None = all)
    trace_tokens: int | None = None  # first tokens of each window the probes use (None = whole window)
    group_rows: int = 64  # row blocks for trace and salience
    group_cols: int = 128  # input-column groups for salience
    salience_damp: float = 0.01
    spike_top_k: int = 8
    spike_threshold: float = SPIKE_THRESHOLD
    interaction_option: str = "int3-g64-asym"
    interaction_windows: int = 2
    interaction_blocks: tuple[int, ...] | None = None  # None = all blocks
    seed: int = 0
    trace_estimator: str = HUTCHINSON  # one of TRACE_ESTIMATORS; EMPIRICAL_FISHER only when streamed

    def __post_init__(self):
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown or not self.signals:
            raise BadInputError(f"unknown signal(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(SIGNALS)}")
        if self.trace_estimator not in TRACE_ESTIMATORS:
            raise BadInputError(f"unknown trace estimator {self.trace_estimator!r}; choose from {', '.join(TRACE_ESTIMATORS)}")
        if "interactions" in self.signals:
            parse_option(self.interaction_option)


# ---- how a plan is verified against measured loss (verify.py runs it) -------------------------------

VERIFY_METRICS = ("kl", "delta_nll")


@dataclass(frozen=True)
class VerifySettings:
    """How a plan is verified. windows: held-back calibration windows measured (the last ones of the
    text that profiling did not use); metric: kl (to the unquantized model; never negative, steadier
    on few tokens) or delta_nll; max_rounds: repair rounds; fanout: parts per localization level;
    uniform_candidates: fitting uniform options measured (those with the least predicted loss); applied: where the
    table holds a stand-in's errors (awq-gptq: awq's), apply the kept plan and the best uniform option with the
    plan's own quantizer too and return the better there (two applies, each as long as `bitalloc apply`; the
    stand-in's ranking alone decides otherwise); progress: show those applies' progress."""

    windows: int = 2
    metric: str = "kl"
    max_rounds: int = 2
    fanout: int = 4
    uniform_candidates: int = 2
    applied: bool = True
    progress: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.metric not in VERIFY_METRICS:
            raise BadInputError(f"unknown verify metric {self.metric!r}; choose one of {', '.join(VERIFY_METRICS)}")
        for name in ("windows", "fanout", "uniform_candidates"):
            if getattr(self, name) < (2 if name == "fanout" else 1):
                raise BadInputError(f"verify {name} must be at least {2 if name == 'fanout' else 1}, got {getattr(self, name)}")
        if self.max_rounds < 0:
            raise BadInputError(f"verify max_rounds must be >= 0, got {self.max_rounds}")
