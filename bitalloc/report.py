"""Profile or plan -> one self-contained HTML page of figures (PNG, base64) with short tables.

Figures, each drawn only when its data is there:
  per-layer sensitivity   bars per block: Hessian trace per parameter and Σ output Fisher (profile)
  spike heatmap           block × projection, log10 of the input spike ratio; flagged cells marked (profile)
  bit allocation          block × projection coloured by bits (plan)
  predicted vs measured   measured single-layer ΔNLL of the interaction ablations vs the table's prediction
                          for that option (profile with interactions and a table)
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .io import atomic_write_text


def write_report(source: str | Path, out: str | Path) -> Path:
    """Read a profile folder (or its profile.json) or a plan JSON and write the report to `out` (.html)."""
    source = Path(source)
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise BadInputError(f"report output {str(out)!r} must end in .html, e.g. --out report.html")
    if source.is_dir() or source.name == "profile.json":
        from .profile.artifact import Profile

        folder = source if source.is_dir() else source.parent
        title, sections = f"profile: {folder}", profile_sections(Profile.load(folder))
    elif source.is_file():
        from .plan import Plan

        title, sections = f"plan: {source}", plan_sections(Plan.load(source))
    else:
        raise BadInputError(f"{str(source)!r} does not exist; pass a profile folder (bitalloc profile --out) or a plan .json")
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


def _figure_html(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"<img src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heatmap(values: np.ndarray, rows, cols, title: str, label: str, marks: np.ndarray | None = None, cmap="viridis"):
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
    return _figure_html(fig)


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# ---- profile ---------------------------------------------------------------------------------------


def profile_sections(profile) -> list[tuple[str, str]]:
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
        for ax, (label, fn) in zip(axes[:, 0], signals.items()):
            per = np.zeros((len(rows), len(cols)))
            for m in mods:
                if m.name in where:
                    per[where[m.name]] = fn(m)
            bottom = np.zeros(len(rows))
            for j, c in enumerate(cols):
                v = np.nan_to_num(per[:, j])
                ax.bar(rows, v, bottom=bottom, label=c)
                bottom += v
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("block")
        axes[0, 0].legend(fontsize=7, ncol=len(cols))
        fig.tight_layout()
        sections.append(("per-layer sensitivity", _figure_html(fig)))
        if any(m.trace is not None for m in mods):
            probes = max(m.trace.probes for m in mods if m.trace)
            worst = max((m.trace.rel_stderr for m in mods if m.trace), default=np.nan)
            sections.append(("Hessian trace estimate", f"<p>{probes} Hutchinson probes; largest relative standard "
                                                       f"error {worst:.3f} (tolerance {s.get('trace_tol')})</p>"))

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
                        cmap="magma")
        body += _table(["module", "site", "max |x|", "ratio", "kurtosis", "top channel", "top token"], table_rows) \
            if table_rows else "<p>no projection above the spike threshold</p>"
        sections.append(("activation spikes", body))

    if profile.interactions:
        ir = [[i.a, i.b, i.relation, f"{i.single_a:.4g}", f"{i.single_b:.4g}", f"{i.joint:.4g}", f"{i.correction:+.4g}"]
              for i in sorted(profile.interactions, key=lambda i: -abs(i.correction))[:30]]
        sections.append(("inter-layer corrections (largest 30)",
                         _table(["a", "b", "relation", "ΔL(a)", "ΔL(b)", "ΔL(a,b)", "correction"], ir)))
        if profile.table is not None:
            sections.append(("predicted vs measured", _predicted_vs_measured(profile)))
    return sections


def _predicted_vs_measured(profile) -> str:
    from .options import parse_option

    plt = _plt()
    table = profile.table
    opt = parse_option(profile.interactions[0].option)
    if opt not in table.options:
        return "<p>the interaction option is not in the candidate table</p>"
    k = table.option_index(opt)
    measured = {}
    for i in profile.interactions:
        measured[i.a], measured[i.b] = i.single_a, i.single_b
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for model in table.errors:
        pts = [(table.errors[model][table.groups.index(n), k], v) for n, v in measured.items() if n in table.groups]
        x, y = np.array(pts).T
        ax.scatter(x, y, s=12, label=model)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel(f"predicted ΔNLL ({opt.label})")
    ax.set_ylabel("measured ΔNLL")
    ax.legend()
    ax.grid(alpha=0.3)
    return _figure_html(fig)


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
                         _heatmap(bits, rows, cols, "storage bits per weight", "bits/weight", cmap="viridis")))
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
