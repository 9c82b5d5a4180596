"""Predicted vs measured end-to-end latency of a quantized model on a hardware profile's kernels.

    python bench/latency.py --profile profiles/cpu-epyc-2t.json [--plans plan-a.json ...]
    python bench/latency.py --profile h100.json --config bench/configs/smollm2-135m   # no weights needed

For each assignment — every planned layer kept, uniform int8-ch-sym, uniform int4-g32-sym, a mixture,
and each given plan — the profile predicts the forward time (the model's time outside its planned
layers, from the profile's model timing, combined with each layer's kernel latency: summed on a CPU,
host and device pipelines overlapped on a GPU) and the model is then run with its layers on those
very kernels and timed. Prints a table; writes bench/out/latency-<profile>.json/.png.
Kernel speed does not depend on the weights' values, so --config (random weights) times the same.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import bitalloc
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.latency import HardwareProfile, LatencyModel, attach_kernels, time_forward
from bitalloc.latency.api import DTYPES
from bitalloc.latency.predict import shape_signature
from bitalloc.models import model_from_config, select_modules, weight_matrix
from bitalloc.options import QuantOption

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--profile", required=True, help="hardware profile JSON with model timings (bitalloc latency --model ...)")
    ap.add_argument("--config", default=None, help="build the model from this config (random weights) instead of --gguf")
    ap.add_argument("--plans", nargs="*", default=[], help="plan JSON files to time as well")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--tokens", default=None, help="only these token counts of the profile's model timings, e.g. 1")
    args = ap.parse_args()
    profile = HardwareProfile.load(args.profile)
    predict = LatencyModel(profile)
    device, dtype = profile.device_type, DTYPES[profile.activation_dtype]

    loaded = (model_from_config(args.config, dtype=dtype, device=device) if args.config
              else bitalloc.load_model(args.gguf or default_gguf()))
    base = loaded.model.to(device, dtype)
    names = select_modules(base)
    shapes = {n: tuple(weight_matrix(base.get_submodule(n)).shape) for n in names}
    signature = shape_signature(type(base).__name__, list(shapes.values()))

    assignments = {
        "all kept (bf16/fp16)": {n: QuantOption.keep() for n in names},
        "uniform int8-ch-sym": {n: QuantOption.int_(8, None, True) for n in names},
        "uniform int4-g32-sym": {n: QuantOption.int_(4, 32, True) for n in names},
    }
    # A mixture, layer by layer, of every kernel the profile has (a plan's kind of assignment).
    cycle = [QuantOption.keep(), QuantOption.int_(8, None, True), QuantOption.int_(4, 32, True), QuantOption.int_(3, 32, False)]
    assignments["mixed, cycling " + "/".join(o.label for o in cycle)] = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    for path in args.plans:
        assignments[Path(path).name] = bitalloc.Plan.load(path).options_by_module()

    rows = []
    for label, assign in assignments.items():
        weights = sum(o * i for o, i in shapes.values())
        storage_bpw = sum(assign[n].storage_bits(*shapes[n]) for n in names) / weights
        kernels_used = sorted({profile.kernel_for_option.get(assign[n].label, "?") for n in names})
        model = copy.deepcopy(base)
        attach_kernels(model, assign, profile)
        for m in profile.models:
            if m.signature != signature or (args.tokens and str(m.tokens) not in args.tokens.split(",")):
                continue
            t0 = time.perf_counter()
            layers = sum(predict.predict(assign[n], *shapes[n], m.tokens) for n in names)
            host = sum(predict.predict_host(assign[n], *shapes[n], m.tokens) for n in names)
            predicted = predict.combine(m.other_s, layers, host, m.layer_scale)
            measured = time_forward(model, m.tokens, m.context, samples=args.samples).median_s
            rows.append({"assignment": label, "storage_bpw": round(storage_bpw, 4), "tokens": m.tokens, "context": m.context,
                         "kernels": kernels_used, "predicted_layers_ms": round(layers * 1e3, 3),
                         "predicted_ms": round(predicted * 1e3, 3), "measured_ms": round(measured * 1e3, 3),
                         "ratio": round(predicted / measured, 3), "seconds": round(time.perf_counter() - t0, 1)})
            r = rows[-1]
            print(f"{label:32s} {r['storage_bpw']:7.3f} bpw  {m.tokens:4d} tok  predicted {r['predicted_ms']:9.2f} ms  "
                  f"measured {r['measured_ms']:9.2f} ms  ratio {r['ratio']:.3f}  ({', '.join(kernels_used)})", flush=True)
        del model
    if not rows:
        raise SystemExit(f"profile {profile.name} has no model timing for {signature}; measure with `bitalloc latency --model ...`")

    out_dir = Path(args.out)
    stem = f"latency-{profile.name}-{Path(args.config).name if args.config else Path(loaded.source).stem}"
    result = {"profile": profile.name, "device": profile.device_name, "dtype": profile.activation_dtype,
              "threads": profile.threads, "model": loaded.source, "rows": rows}
    atomic_write_text(out_dir / f"{stem}.json", canonical_json(result))
    plot(rows, out_dir / f"{stem}.png", f"{profile.name}: {profile.device_name}")
    print(f"wrote {out_dir / stem}.json and .png")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["tokens"] for r in rows}), figsize=(11, 4.5), squeeze=False)
    for ax, tokens in zip(axes[0], sorted({r["tokens"] for r in rows})):
        sel = [r for r in rows if r["tokens"] == tokens]
        hi = max(max(r["predicted_ms"], r["measured_ms"]) for r in sel) * 1.1
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls="--", label="predicted = measured")
        for r in sel:
            ax.scatter(r["measured_ms"], r["predicted_ms"], s=30)
            ax.annotate(r["assignment"], (r["measured_ms"], r["predicted_ms"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="measured forward (ms)", ylabel="predicted forward (ms)", xlim=(0, hi), ylim=(0, hi),
               title=f"{tokens} token(s) after {sel[0]['context']} cached")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
