"""User constraints on a plan, applied once, outside the solvers, as masks on the candidate table.

Solvers see only their effect: disallowed cells (NaN storage) and ties between groups. Pins
are explicit per-module choices and win over the bit bounds and option filters; everything
else narrows what each module may choose. Every error names the constraint and the module.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .table import CandidateTable
from .errors import BadInputError, setting
from .options import parse_option

# "fused": what serving stacks fuse into one matmul: q/k/v of an attention block, gate/up
# (w1/w3 in Mixtral-style experts) of an MLP. Keyed by the parent module, so per block.
# In an MoE block the experts' weights are one fused tensor per projection in vLLM's FusedMoE
# (w13 = every expert's gate/up, w2 = every expert's down) and SGLang / TensorRT-LLM alike, so
# all experts of a block share one option per projection. Tried first: an expert's gate/up are
# tied across the experts, not only with each other.
FUSED_EXPERTS = (
    (re.compile(r"^(.*\.experts)\.\d+\.(gate_proj|up_proj|w1|w3)$"), "experts_gate_up"),
    (re.compile(r"^(.*\.experts)\.\d+\.(down_proj|w2)$"), "experts_down"),
)
FUSED = (
    (re.compile(r"^(.*)\.(q_proj|k_proj|v_proj)$"), "qkv"),
    (re.compile(r"^(.*)\.(gate_proj|up_proj)$"), "gate_up"),
    (re.compile(r"^(.*)\.(w1|w3)$"), "w1_w3"),
)
# llama.cpp (a table of GGUF types and fp16 only) stores q/k/v and gate/up as separate tensors
# (attn_q/attn_k/attn_v, ffn_gate/ffn_up), each with its own type; what it stores as one tensor are
# an MoE block's experts, one 3-D tensor per projection (ffn_gate_exps, ffn_up_exps, ffn_down_exps).
FUSED_GGUF = (
    (re.compile(r"^(.*\.experts)\.\d+\.(gate_proj|w1)$"), "experts_gate"),
    (re.compile(r"^(.*\.experts)\.\d+\.(up_proj|w3)$"), "experts_up"),
    (re.compile(r"^(.*\.experts)\.\d+\.(down_proj|w2)$"), "experts_down"),
)
# The default: plans deploy to the serving stacks as they are (`--tie none` lifts it).
DEFAULT_TIES = ("fused",)


@dataclass(frozen=True)
class Constraints:
    """min_bits / max_bits: bounds on every planned module's nominal bits (fp16 counts 16). min_bits "uniform":
    the bits of the uniform plan that fits the budget with the least predicted loss (uniform.uniform_floor; solve_table
    resolves it): the additive error model over-rates plans that take some modules far below that width (docs/results.md,
    *A floor at the uniform option's bits*).
    pins: (module regex, option label): matching modules take exactly that option.
    allow: (module regex, option-label regex): matching modules choose only among matching options.
    ties: "fused" (q/k/v, gate/up per block and each projection across a block's experts: what
    serving stacks fuse; the default, a no-op where a model has none; for a table of GGUF types
    only the experts, which llama.cpp stores as one tensor per projection) or module regexes whose
    matches share one option; a regex with groups ties the modules whose groups match alike (e.g.
    one tie per layer). () = no ties.
    max_latency: predicted seconds; needs a latency matrix."""

    min_bits: int | str | None = None  # str: only "uniform"
    max_bits: int | None = None
    pins: tuple[tuple[str, str], ...] = ()
    allow: tuple[tuple[str, str], ...] = ()
    ties: tuple[str, ...] = DEFAULT_TIES
    max_latency: float | None = None

    @property
    def active(self) -> bool:
        """Anything beyond the bare option grid (the default fused ties count: the plan records them)."""
        return self != Constraints(ties=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pins"] = [list(p) for p in self.pins]
        d["allow"] = [list(a) for a in self.allow]
        d["ties"] = list(self.ties)
        return d


@dataclass(frozen=True)
class Masks:
    allowed: np.ndarray  # [G, K] what each group may choose
    ties: tuple[tuple[int, ...], ...] = field(default=())
    tie_kinds: tuple[str, ...] = field(default=())  # per tie: qkv, gate_up, experts_down, ... or the user's regex


def parse_ties(items: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """--tie values: none given = the default (fused); 'none' alone = no ties."""
    items = tuple(items)
    if not items:
        return DEFAULT_TIES
    if "none" in items:
        if len(items) > 1:
            raise BadInputError(f"{setting('ties')} none lifts every tie and cannot be combined with "
                                f"{' '.join(i for i in items if i != 'none')}")
        return ()
    return items


def parse_rule(text: str, flag: str) -> tuple[str, str]:
    """'REGEX=VALUE' (the last '=' splits, since labels never hold one)."""
    regex, sep, value = text.rpartition("=")
    if not sep or not regex or not value:
        raise BadInputError(f"cannot read {flag} {text!r}; write REGEX=VALUE, e.g. {flag} 'lm_head=fp16'")
    _compile(regex, f"{flag} {text!r}")
    return regex, value


def _compile(regex: str, where: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise BadInputError(f"{where}: {regex!r} is not a valid regular expression ({e})") from None


def constraint_masks(table: CandidateTable, constraints: Constraints) -> Masks:
    """The table's allowed cells narrowed by the constraints, and the ties as group indices."""
    names = table.groups
    allowed = table.allowed.copy()
    bits = np.array([o.bits for o in table.options])
    labels = [o.label for o in table.options]
    narrowed = allowed.copy()
    flags = []
    if constraints.min_bits is not None:
        if not isinstance(constraints.min_bits, int):
            raise BadInputError(f"{setting('min_bits')} {constraints.min_bits!r} is resolved by a budget: solve the table "
                                "with one (api.solve_table), or give a number of bits")
        narrowed &= bits[None, :] >= constraints.min_bits
        flags.append(f"{setting('min_bits')} {constraints.min_bits}")
    if constraints.max_bits is not None:
        narrowed &= bits[None, :] <= constraints.max_bits
        flags.append(f"{setting('max_bits')} {constraints.max_bits}")
    allow_flags: dict[int, list[str]] = {}
    for regex, label_regex in constraints.allow:
        where = f"allow '{regex}={label_regex}'"
        hits = _matching(names, regex, where)
        ok = np.array([_compile(label_regex, where).fullmatch(lbl) is not None for lbl in labels])
        if not ok.any():
            raise BadInputError(f"{where} matches no offered option (offered: {', '.join(labels)})")
        narrowed[hits] &= ok[None, :]
        for g in hits:
            allow_flags.setdefault(int(g), []).append(f"{setting('allow')} '{regex}={label_regex}'")

    pinned: dict[int, tuple[int, str]] = {}
    for regex, label in constraints.pins:
        where = f"pin '{regex}={label}'"
        option = parse_option(label)
        if option not in table.options:
            raise BadInputError(f"{where}: option {option.label} is not offered (offered: {', '.join(labels)}); "
                                f"add it with {setting('bits')}/{setting('group_sizes')}")
        k = table.options.index(option)
        for g in _matching(names, regex, where):
            if g in pinned and pinned[g][0] != k:
                raise BadInputError(f"{where} and {pinned[g][1]} both match module {names[g]} with different options")
            if not table.allowed[g, k]:
                raise BadInputError(f"{where}: {option.label} cannot store module {names[g]} "
                                    f"(shape {list(table.shapes[g])}: the group size does not divide its rows)")
            pinned[g] = (k, where)
    for g in range(len(names)):
        if g in pinned:
            allowed[g] = False
            allowed[g, pinned[g][0]] = True
        else:
            allowed[g] = narrowed[g]
            if not allowed[g].any():
                applied = " ".join(flags + allow_flags.get(g, []))
                raise BadInputError(f"module {names[g]} has no option left after {applied}; widen the bounds or filters")
    gguf_only = all(o.fmt in ("gguf", "keep") for o in table.options)
    ties = _ties(names, constraints.ties, FUSED_GGUF if gguf_only else (*FUSED_EXPERTS, *FUSED))
    for tie, origin, _ in ties:
        if not allowed[list(tie)].all(axis=0).any():
            members = ", ".join(names[g] for g in tie)
            lift = f" or {setting('ties')} none" if origin == "fused" else ""
            raise BadInputError(f"tie '{origin}' groups {members}, which share no allowed option "
                                f"(check {setting('pins')}/{setting('min_bits')}/{setting('max_bits')}/{setting('allow')} for them{lift})")
    return Masks(allowed, tuple(t for t, _, _ in ties), tuple(k for _, _, k in ties))


def _matching(names: list[str], regex: str, where: str) -> np.ndarray:
    pattern = _compile(regex, where)
    hits = np.array([g for g, n in enumerate(names) if pattern.search(n)], dtype=np.int64)
    if hits.size == 0:
        raise BadInputError(f"{where} matches no module; planned modules look like {names[0]!r}")
    return hits


def _ties(names: list[str], specs: tuple[str, ...], fused: tuple) -> list[tuple[tuple[int, ...], str, str]]:
    """(group indices, the spec that tied them, kind) per tie, in module order; fused: the (pattern,
    kind) pairs "fused" stands for on the plan's runtime, the first match per module."""
    out = []
    for spec in specs:
        groups: dict[tuple, list[int]] = {}
        if spec == "fused":
            for g, n in enumerate(names):
                for pattern, kind in fused:
                    if m := pattern.match(n):
                        groups.setdefault((m.group(1), kind), []).append(g)
                        break
        else:
            pattern = _compile(spec, f"tie '{spec}'")
            for g, n in enumerate(names):
                if m := pattern.search(n):
                    groups.setdefault(m.groups(), []).append(g)
        found = [(tuple(v), key[-1] if spec == "fused" else spec)
                 for key, v in sorted(groups.items(), key=lambda kv: kv[1][0]) if len(v) > 1]
        # fused finding nothing is fine (e.g. GPT-2's c_attn is already one matrix); a regex must tie something
        if not found and spec != "fused":
            raise BadInputError(f"tie '{spec}' matches no two modules (with equal groups); planned modules look like {names[0]!r}")
        out.extend((t, spec, kind) for t, kind in found)
    return out
