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
from .errors import BadInputError
from .options import parse_option

# "fused": what serving stacks fuse into one matmul: q/k/v of an attention block, gate/up
# (w1/w3 in Mixtral-style experts) of an MLP. Keyed by the parent module, so per block.
FUSED = (
    (re.compile(r"^(.*)\.(q_proj|k_proj|v_proj)$"), "qkv"),
    (re.compile(r"^(.*)\.(gate_proj|up_proj)$"), "gate_up"),
    (re.compile(r"^(.*)\.(w1|w3)$"), "w1_w3"),
)


@dataclass(frozen=True)
class Constraints:
    """min_bits / max_bits: bounds on every planned module's nominal bits (fp16 counts 16).
    pins: (module regex, option label): matching modules take exactly that option.
    allow: (module regex, option-label regex): matching modules choose only among matching options.
    ties: "fused" (q/k/v and gate/up per block) or module regexes whose matches share one option;
    a regex with groups ties the modules whose groups match alike (e.g. one tie per layer).
    max_latency: predicted seconds; needs a latency matrix."""

    min_bits: int | None = None
    max_bits: int | None = None
    pins: tuple[tuple[str, str], ...] = ()
    allow: tuple[tuple[str, str], ...] = ()
    ties: tuple[str, ...] = ()
    max_latency: float | None = None

    @property
    def active(self) -> bool:
        return self != Constraints()

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
        narrowed &= bits[None, :] >= constraints.min_bits
        flags.append(f"--min-bits {constraints.min_bits}")
    if constraints.max_bits is not None:
        narrowed &= bits[None, :] <= constraints.max_bits
        flags.append(f"--max-bits {constraints.max_bits}")
    allow_flags: dict[int, list[str]] = {}
    for regex, label_regex in constraints.allow:
        where = f"allow '{regex}={label_regex}'"
        hits = _matching(names, regex, where)
        ok = np.array([_compile(label_regex, where).fullmatch(lbl) is not None for lbl in labels])
        if not ok.any():
            raise BadInputError(f"{where} matches no offered option (offered: {', '.join(labels)})")
        narrowed[hits] &= ok[None, :]
        for g in hits:
            allow_flags.setdefault(int(g), []).append(f"--allow '{regex}={label_regex}'")

    pinned: dict[int, tuple[int, str]] = {}
    for regex, label in constraints.pins:
        where = f"pin '{regex}={label}'"
        option = parse_option(label)
        if option not in table.options:
            raise BadInputError(f"{where}: option {option.label} is not offered (offered: {', '.join(labels)}); "
                                "add it with --bits/--group-sizes")
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
    ties = _ties(names, constraints.ties)
    for tie, origin in ties:
        if not allowed[list(tie)].all(axis=0).any():
            members = ", ".join(names[g] for g in tie)
            raise BadInputError(f"tie '{origin}' groups {members}, which share no allowed option "
                                "(check --pin/--min-bits/--max-bits/--allow for them)")
    return Masks(allowed, tuple(t for t, _ in ties))


def _matching(names: list[str], regex: str, where: str) -> np.ndarray:
    pattern = _compile(regex, where)
    hits = np.array([g for g, n in enumerate(names) if pattern.search(n)], dtype=np.int64)
    if hits.size == 0:
        raise BadInputError(f"{where} matches no module; planned modules look like {names[0]!r}")
    return hits


def _ties(names: list[str], specs: tuple[str, ...]) -> list[tuple[tuple[int, ...], str]]:
    out = []
    for spec in specs:
        groups: dict[tuple, list[int]] = {}
        if spec == "fused":
            for g, n in enumerate(names):
                for pattern, kind in FUSED:
                    if m := pattern.match(n):
                        groups.setdefault((m.group(1), kind), []).append(g)
        else:
            pattern = _compile(spec, f"tie '{spec}'")
            for g, n in enumerate(names):
                if m := pattern.search(n):
                    groups.setdefault(m.groups(), []).append(g)
        found = [tuple(v) for _, v in sorted(groups.items(), key=lambda kv: kv[1][0]) if len(v) > 1]
        if not found:
            what = "q/k/v or gate/up modules of one block" if spec == "fused" else "two modules (with equal groups)"
            raise BadInputError(f"tie '{spec}' matches no {what}; planned modules look like {names[0]!r}")
        out.extend((t, spec) for t in found)
    return out
