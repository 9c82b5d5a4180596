"""What the exporters share: fused-layer tie rules, the plan's dominant option, JSON output."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ..errors import BadInputError, setting
from ..io import atomic_write_text, canonical_json
from ..options import QuantOption
from ..plan import Plan

# vLLM and TensorRT-LLM load these projections as one fused layer (QKVParallelLinear,
# MergedColumnParallelLinear), and a fused layer has one quantization scheme: vLLM raises
# "Fused module ... requires consistent quant config" (auto-round), "Mixed quant_algo within fused
# layer" (modelopt_mixed). Keys: the fused name vLLM uses; values: the Hugging Face shard names.
FUSED_IN_VLLM = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

# Spelled by each adapter (errors.setting): `--tie fused` / `--allow-untied` on the command line.
TIE_FIX = f"re-plan with {setting('ties')} fused (the default), or write it anyway with {setting('allow_untied')}"


def fused_groups(modules) -> dict[str, list[str]]:
    """'<parent>.<fused name>' -> the planned shard modules vLLM fuses into it, in fused order (q, k, v)."""
    groups: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for module in modules:
        parent, _, leaf = module.rpartition(".")
        for fused, shards in FUSED_IN_VLLM.items():
            if leaf in shards:
                groups[f"{parent}.{fused}" if parent else fused].append((shards.index(leaf), module))
    return {k: [m for _, m in sorted(v)] for k, v in sorted(groups.items())}


def untied_fused_groups(plan: Plan) -> list[str]:
    """One line per fused layer whose shards the plan gives different options (compared as options:
    a label is derived text, and two shards must share the stored format, not its name)."""
    options = {a.module: a.option for a in plan.assignments}
    lines = []
    for fused, shards in fused_groups(options).items():
        if len({options[s] for s in shards}) > 1:
            lines.append(f"{fused}: " + ", ".join(f"{s.rpartition('.')[2]}={options[s].label}" for s in shards))
    return lines


def check_fused_ties(plan: Plan, target: str, allow_untied: bool) -> list[str]:
    """Raise BadInputError when fused shards differ (the target would refuse the model), or, with
    allow_untied, return the violations as unsupported lines."""
    bad = untied_fused_groups(plan)
    if not bad:
        return []
    if not allow_untied:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise BadInputError(
            f"{target}: vLLM/TensorRT-LLM fuse q/k/v and gate/up into one layer with one scheme, but the plan "
            f"gives {bad[0]}{more}; {TIE_FIX}")
    # allow_untied was asked for, so the note says only what the serving engine needs (no setting to name)
    return [f"fused layer {line}: the serving engine needs one scheme for these shards (re-plan with the default "
            "fused ties)" for line in bad]


def require_whole_modules(plan: Plan, target: str) -> None:
    """Every target here sets one scheme per module; a plan splitting a module into row groups cannot be written."""
    split = sorted({a.module for a in plan.assignments if a.rows is not None})
    if split:
        raise BadInputError(f"{target} sets one scheme per module, but the plan splits {split[0]}"
                            f"{f' (and {len(split) - 1} more)' if len(split) > 1 else ''} into row groups; "
                            "plan whole modules for this target")


def dominant_option(plan: Plan, usable: Callable[[QuantOption], bool] = lambda o: True) -> QuantOption | None:
    """The usable option covering the most weights (ties broken by label), or None if none is usable."""
    weights: dict[QuantOption, int] = defaultdict(int)
    for a in plan.assignments:
        o = a.option
        if usable(o):
            weights[o] += a.shape[0] * a.shape[1]
    if not weights:
        return None
    return max(weights, key=lambda o: (weights[o], _neg_label(o.label)))


def _neg_label(label: str) -> tuple:
    return tuple(-ord(c) for c in label)  # max() over this prefers the alphabetically first label


def exact_regex(*names: str) -> str:
    """An anchored regex matching exactly these module names."""
    escaped = [re.escape(n) for n in names]
    return f"^{escaped[0]}$" if len(escaped) == 1 else f"^(?:{'|'.join(escaped)})$"


def write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, canonical_json(obj))


def group_size_field(o: QuantOption) -> int:
    """GPTQ/AutoRound convention: -1 = one scale per output channel."""
    return -1 if o.per_channel else o.group_size
