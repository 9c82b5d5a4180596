"""Profile or plan -> one self-contained HTML page of figures (PNG, base64) with short tables.

Figures, each drawn only when its data is there:
  per-layer sensitivity   bars per block: Hessian trace per parameter and Σ output Fisher (profile)
  spike heatmap           block × projection, log10 of the input spike ratio; flagged cells marked (profile)
  bit allocation          block × projection coloured by bits (plan)
  predicted vs measured   measured single-module ΔNLL against the predicted one, log-log, Spearman ρ in the
                          title: from a measured-sensitivity JSON (--measured; bench/sensitivity.py's format:
                          {"rows": [{"module", "option", "measured", ...}]}) or a profile's measured singles
                          (the interaction ablations). Predictions come from a profile's candidate table, or
                          for a plan from its assignments (rows at the planned option), else from the rows'
                          own prediction column for the error model (bench/sensitivity.py records it)

Next to every image the page embeds the figure's numbers as JSON
(<script type="application/json" class="figure-data" data-figure="...">), so the figures can be checked
and re-plotted without reading pixels.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .errors import BadInputError, setting, step
from .config import DEFAULT_ERROR_MODEL, default_error_model
from .io import atomic_write_text, check_output_file


def write_report(source: str | Path, out: str | Path, measured: str | Path | None = None,
                 error_model: str | None = None) -> Path:
    """Read a profile folder (or its profile.json) or a plan JSON and write the report to `out` (.html).

    measured: a measured-sensitivity JSON (bench/sensitivity.py's format) to draw predicted vs measured
    ΔNLL from; error_model: which of the table's predictions to draw against it (None: the one its plans
    are solved under by default, config.default_error_model).
    """
    source = Path(source)
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise BadInputError(f"report output {str(out)!r} must end in .html, e.g. {setting('out')} report.html")
    check_output_file(out)
    rows = read_measured(measured) if measured is not None else None
    if source.is_dir() or source.name == "profile.json":
        from .profile.artifact import Profile

        folder = source if source.is_dir() else source.parent
        prof = Profile.load(folder)
        if error_model is None:
            error_model = DEFAULT_ERROR_MODEL if prof.table is None else default_error_model(prof.table.options)
        title, sections = f"profile: {folder}", profile_sections(prof, error_model)
        if rows is not None:
            sections.append(("predicted vs measured (" + Path(measured).name + ")",
                             predicted_vs_measured_html(predicted_vs_measured(prof, rows, error_model))))
    elif source.is_file():
        from .plan import Plan

        plan = Plan.load(source)
        title, sections = f"plan: {source}", plan_sections(plan)
        if rows is not None:
            sections.append(("predicted vs measured (" + Path(measured).name + ")",
                             predicted_vs_measured_html(predicted_vs_measured(plan, rows, plan.error_model))))
    else:
        raise BadInputError(f"{str(source)!r} does not exist; pass a profile folder (what {step('profile')} writes) or a plan .json")
    page = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
            "td,th{padding:2px 8px;text-align:right}</style>", f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        page.append(f"<h2>{html.escape(heading)}</h2>{body}")
    return atomic_write_text(out, "\n".join(page) + "\n")


# ---- layout: module names -> (block, projection) -------------------------------------------------


def grid(names: list[str], blocks: list[int | None]) -> tuple[list[int], list[str], dict[str, tuple[int, int]]]:
    """Rows = blocks, columns = projection names (the module path after the block index)."""
    rows = sorted({b for b in blocks if b is not None})
    cols: list[str] = []
    where = {}
    for n, b in zip(names, blocks):
        if b is None:
            continue
        proj = n.split(f".{b}.", 1)[-1]
        if proj not in cols:
            cols.append(proj)
        where[n] = (rows.index(b), cols.index(proj))
    return rows, cols, where


def _figure_html(fig, name: str, data: dict) -> str:
    """The figure as an inline PNG, followed by the numbers it plots as JSON (NaN as null)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    payload = json.dumps(_jsonable(data), sort_keys=True, allow_nan=False).replace("</", "<\\/")
    return (f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"
            f"<script type='application/json' class='figure-data' data-figure='{name}'>{payload}</script>")


def figure_data(page: str) -> dict[str, dict]:
    """The JSON figure data embedded in a report page, by figure name."""
    import re

    found = re.findall(r"<script type='application/json' class='figure-data' data-figure='([^']+)'>(.*?)</script>", page, re.S)
    return {name: json.loads(body.replace("<\\/", "</")) for name, body in found}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    return x


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(values: np.ndarray, rows, cols, title: str, label: str, marks: np.ndarray | None = None, cmap="viridis",
             name: str = "heatmap"):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.25 * len(rows) + 1.5))
    im = ax.imshow(values, aspect="auto", cmap=cmap)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    if marks is not None:
        ys, xs = np.nonzero(marks)
        ax.scatter(xs, ys, marker="x", color="red", s=30, label="flagged")
        if len(xs):
            ax.legend(loc="upper right", fontsize=7)
    data = {"blocks": rows, "projections": cols, "values": values, "title": title}
    if marks is not None:
        data["marked"] = marks
    return _figure_html(fig, name, data)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ---- profile ---------------------------------------------------------------------------------------


def profile_sections(profile, error_model: str = "fisher") -> list[tuple[str, str]]:
    plt = _plt()
    mods = profile.modules
    names, blocks = [m.name for m in mods], [m.block for m in mods]
    rows, cols, where = grid(names, blocks)
    sections = []
    s = profile.settings
    sections.append(("settings", f"<pre>{html.escape(json.dumps({k: s.get(k) for k in ('model', 'calibration', 'signals')}, indent=1))}</pre>"))

    # per-layer sensitivity: one bar per block (summed over its projections), per signal
    signals = {}
    if any(m.trace is not None for m in mods):
        signals["Hessian trace per parameter (Σ over the block's projections)"] = lambda m: m.trace.per_param if m.trace else np.nan
    if any(m.fisher is not None for m in mods):
        signals["Σ output Fisher (mean (∂L/∂y)²)"] = lambda m: float(m.fisher.sum()) if m.fisher is not None else np.nan
    if any(m.salience is not None for m in mods):
        signals["Hessian salience Σ w²/[H⁻¹]ⱼⱼ²"] = lambda m: m.salience.total("hessian") if m.salience else np.nan
    if signals and rows:
        fig, axes = plt.subplots(len(signals), 1, figsize=(10, 2.6 * len(signals)), squeeze=False)
        bars = {"blocks": rows, "projections": cols, "signals": {}}
        for ax, (label, fn) in zip(axes[:, 0], signals.items()):
            per = np.zeros((len(rows), len(cols)))
            for m in mods:
                if m.name in where:
                    per[where[m.name]] = fn(m)
            bars["signals"][label] = per  # [block, projection]: each bar stacks one row
            bottom = np.zeros(len(rows))
            for j, c in enumerate(cols):
                v = np.nan_to_num(per[:, j])
                ax.bar(rows, v, bottom=bottom, label=c)
                bottom += v
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("block")
        axes[0, 0].legend(fontsize=7, ncol=len(cols))
        fig.tight_layout()
        sections.append(("per-layer sensitivity", _figure_html(fig, "sensitivity", bars)))
        if any(m.trace is not None for m in mods):
            traced = [m for m in mods if m.trace]
            probes = [m.trace.probes for m in traced]
            worst = max(m.trace.rel_stderr for m in traced)
            rules = {r: sum(m.trace.stopped_by == r for m in traced) for r in ("relative", "absolute", "max_probes")}
            if s.get("trace_estimator") == "empirical-fisher":  # streamed: one sample per window, no stopping rule
                intro = (f"<p>empirical-Fisher trace (streamed profile; profile/fisher_trace.py), {max(probes)} windows; "
                         f"largest relative standard error over windows {worst:.3f}</p>")
            else:
                intro = (f"<p>{min(probes)}-{max(probes)} Hutchinson probes per layer; largest relative standard error {worst:.3f} "
                         f"(tolerance {s.get('trace_tol')}, absolute {s.get('trace_abs_tol')} of the largest |trace|); stopped by "
                         + ", ".join(f"{r}: {c}" for r, c in rules.items()) + "</p>")
            sections.append(("Hessian trace estimate", (
                intro
                + _table(["module", "trace", "std. error", "probes", "stopped by"],
                         [[m.name, f"{m.trace.trace:.4g}", f"{m.trace.stderr:.3g}", m.trace.probes, m.trace.stopped_by or "-"]
                          for m in traced]))))

    if any(m.spikes is not None for m in mods) and rows:
        ratio = np.full((len(rows), len(cols)), np.nan)
        flag = np.zeros_like(ratio, dtype=bool)
        table_rows = []
        for m in mods:
            if m.spikes is None or m.name not in where:
                continue
            ratio[where[m.name]] = np.log10(max(m.spikes.input.ratio, 1e-12))
            flag[where[m.name]] = m.spikes.input.flagged
            for site, st in (("input", m.spikes.input), ("output", m.spikes.output)):
                if st.flagged:
                    w, p, c = st.top_tokens[0]
                    table_rows.append([m.name, site, f"{st.max_abs:.4g}", f"{st.ratio:.4g}", f"{st.kurtosis:.4g}",
                                       int(st.top_channels[0]), f"window {w} position {p}"])
        body = _heatmap(ratio, rows, cols, "input spike ratio: max|x| / median channel RMS (log10)", "log10 ratio", flag,
                        cmap="magma", name="spikes")
        body += _table(["module", "site", "max |x|", "ratio", "kurtosis", "top channel", "top token"], table_rows) \
            if table_rows else "<p>no projection above the spike threshold</p>"
        sections.append(("activation spikes", body))

    if profile.interactions:
        ir = [[i.a, i.b, i.relation, f"{i.single_a:.4g}", f"{i.single_b:.4g}", f"{i.joint:.4g}", f"{i.correction:+.4g}"]
              for i in sorted(profile.interactions, key=lambda i: -abs(i.correction))[:30]]
        why = ("<p>These corrections are reported, not optimized. They are measured at one option "
               f"({html.escape(profile.interactions[0].option)}) for pairs inside a block, so there is no correction "
               "for the other option pairs a plan chooses between; and the solvers take a separable cost per "
               "(module, option): pairwise terms would need a product variable per pair and option pair in the ILP "
               "and would break the per-module Lagrangian and DP decompositions. Where the corrections are small "
               "against the joint ΔNLL (they are on SmolLM2: bench/out/sensitivity.json), the separable objective "
               "loses little.</p>")
        sections.append(("inter-layer corrections (largest 30)",
                         _table(["a", "b", "relation", "ΔL(a)", "ΔL(b)", "ΔL(a,b)", "correction"], ir) + why))
        if profile.table is not None:
            singles = {}
            for i in profile.interactions:
                singles[i.a], singles[i.b] = i.single_a, i.single_b
            rows = [{"module": n, "option": profile.interactions[0].option, "measured": v} for n, v in singles.items()]
            sections.append(("predicted vs measured (the profile's single-module ablations)",
                             predicted_vs_measured_html(predicted_vs_measured(profile, rows, error_model))))
    return sections


# ---- predicted vs measured -------------------------------------------------------------------------


def read_measured(path: str | Path) -> list[dict]:
    """Rows {"module", "option", "measured", ...} of a measured-sensitivity JSON (bench/sensitivity.py writes one)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"measured-sensitivity file {str(path)!r} does not exist; pass e.g. bench/out/sensitivity.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path} is not readable JSON ({e}); pass a file written by bench/sensitivity.py") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and {"module", "option", "measured"} <= r.keys() for r in rows):
        raise BadInputError(f"{path} has no rows of {{module, option, measured}}; expected bench/sensitivity.py's "
                            'format: {"rows": [{"module": ..., "option": ..., "measured": ΔNLL}, ...]}')
    return rows


def predicted_vs_measured(source, rows: list[dict], error_model: str = "fisher") -> dict:
    """Predicted and measured ΔNLL per measured (module, option), and their Spearman ρ.

    source: a Profile (predictions from its candidate table) or a Plan (its assignments at their
    planned option; rows at other options fall back to the row's own `error_model` column).
    """
    from scipy.stats import spearmanr

    from .options import parse_option

    predicted: dict[tuple[str, str], float] = {}
    table = getattr(source, "table", None)
    if table is not None:
        if error_model not in table.errors:
            raise BadInputError(f"the profile's table has no error model {error_model!r} (has {', '.join(table.errors)})")
        index = {o.label: k for k, o in enumerate(table.options)}
        for g, name in enumerate(table.groups):
            for label, k in index.items():
                predicted[name, label] = float(table.errors_of(error_model)[g, k])
        origin = f"the profile's candidate table ({error_model})"
    elif hasattr(source, "assignments"):
        predicted = {(a.module, a.label): a.predicted_delta_loss for a in source.assignments}
        origin = f"the plan ({source.error_model})"
    else:
        raise BadInputError("predicted vs measured needs a profile with a candidate table or a plan")
    modules, options, pred, meas, own = [], [], [], [], 0
    for r in rows:
        label = parse_option(r["option"]).label
        p = predicted.get((r["module"], label))
        if p is None and isinstance(r.get(error_model), (int, float)):
            p, own = float(r[error_model]), own + 1
        if p is None or r["measured"] is None:
            continue
        modules.append(r["module"])
        options.append(label)
        pred.append(p)
        meas.append(float(r["measured"]))
    if len(pred) < 2:
        raise BadInputError(f"only {len(pred)} measured (module, option) pair(s) have a prediction in {origin}; "
                            "measure modules and options the profile or plan covers")
    if own:
        origin += f"; {own} of {len(pred)} from the measured file's own {error_model!r} column"
    rho = float(spearmanr(pred, meas)[0])
    return {"modules": modules, "options": options, "predicted": pred, "measured": meas, "spearman": rho,
            "error_model": error_model, "origin": origin}


def predicted_vs_measured_html(points: dict) -> str:
    plt = _plt()
    pred, meas = np.array(points["predicted"]), np.array(points["measured"])
    opts = np.array(points["options"])
    positive = (pred > 0) & (meas > 0)  # log axes: ΔNLL <= 0 (measurement noise) cannot be drawn
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    for label in sorted(set(points["options"])):
        sel = positive & (opts == label)
        ax.scatter(pred[sel], meas[sel], s=14, label=label)
    if positive.any():
        lo, hi = min(pred[positive].min(), meas[positive].min()), max(pred[positive].max(), meas[positive].max())
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"predicted ΔNLL ({points['error_model']}, nats)")
    ax.set_ylabel("measured ΔNLL (nats)")
    ax.set_title(f"predicted vs measured: Spearman ρ = {points['spearman']:.3f} (n = {len(pred)})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    dropped = int((~positive).sum())
    note = (f"<p>{len(pred)} measured (module, option) pairs; predictions from {html.escape(points['origin'])}. "
            f"Spearman ρ over all pairs; {dropped} pair(s) with a ΔNLL &le; 0 are left off the log axes.</p>")
    return _figure_html(fig, "predicted_vs_measured", points) + note


# ---- plan ------------------------------------------------------------------------------------------


def plan_sections(plan) -> list[tuple[str, str]]:
    names = [a.module for a in plan.assignments]
    blocks = [_block_from_name(n) for n in names]
    rows, cols, where = grid(names, blocks)
    bits = np.full((len(rows), len(cols)), np.nan)
    for a in plan.assignments:
        if a.module in where:
            bits[where[a.module]] = a.storage_bits / (a.shape[0] * a.shape[1])
    s = plan.summary
    summary = (f"<p>{s.planned_modules} modules, storage {s.storage_bits_per_weight:.4f} bits/weight, "
               f"predicted ΔNLL {s.predicted_delta_loss:.4g} nats, budget {html.escape(plan.budget.text)}</p>")
    sections = [("summary", summary)]
    if rows:
        sections.append(("bit allocation (storage bits per weight)",
                         _heatmap(bits, rows, cols, "storage bits per weight", "bits/weight", cmap="viridis",
                                  name="bit_allocation")))
    others = [[a.module, a.label, f"{a.predicted_delta_loss:.4g}"] for a in plan.assignments if a.module not in where]
    if others:
        sections.append(("outside the blocks", _table(["module", "option", "predicted ΔNLL"], others)))
    return sections


def _block_from_name(name: str) -> int | None:
    """The first all-digit path component: the block index in every decoder-block layout we plan."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None
