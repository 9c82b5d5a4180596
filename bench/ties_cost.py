"""What the default fused ties cost INT plans on SmolLM2: one table, solved tied and untied, same windows.

    python bench/ties_cost.py [--quantizer rtn]   # prints one line per budget and tie setting

The default INT grid profiled on 8192 WikiText-2 validation tokens (as bench/quality.py), each plan quantized
with the table's quantizer (default bitalloc's, rtn-w) and scored on 16 x 512 WikiText-2 test tokens. Quoted in
the README (*Ties cost INT plans*; those rows were measured with --quantizer rtn).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bitalloc  # noqa: E402
from bitalloc.api import plan_from_table, profile, resolve_calibration  # noqa: E402
from bitalloc.constraints import Constraints  # noqa: E402
from bitalloc.models import select_modules  # noqa: E402
from bitalloc.options import default_options  # noqa: E402
from common import (add_quantizer_argument, bench_quantizer, default_gguf, importances,  # noqa: E402
                    smollm2_arguments, with_options)

ap = smollm2_arguments(__doc__)
add_quantizer_argument(ap)
args = ap.parse_args()
loaded = bitalloc.load_model(args.gguf or default_gguf())
model = loaded.model
calib = resolve_calibration(args.calib, loaded, 512, 8192, seed=0)
names = select_modules(model)
options = default_options()
quantizer = bench_quantizer(args.quantizer, options)
table = profile(loaded, calib, names, options, cache_dir=bitalloc.api.default_cache_dir(), progress=False, quantizer=quantizer)
importance = importances(model, names, calib, quantizer)
windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, 512, 16)
reference = bitalloc.reference_logprobs(model, windows)
for b in (3.5, 4.5):
    for ties in (("fused",), ()):
        p = plan_from_table(table, f"{b}bits", loaded, calib, constraints=Constraints(ties=ties))
        r = with_options(model, p.options_by_module(), lambda m: bitalloc.evaluate(m, windows, reference=reference),
                         quantizer, importance)
        print(b, ties, quantizer, "predicted %.4f" % p.summary.predicted_delta_loss, r.describe(), flush=True)
