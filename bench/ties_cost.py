"""What the default fused ties cost INT plans on SmolLM2: one table, solved tied and untied, same windows.

    python bench/ties_cost.py     # from the repository root; prints one line per budget and tie setting

The default INT grid profiled on 8192 WikiText-2 validation tokens (as bench/quality.py), each plan applied
with RTN and scored on 16 x 512 WikiText-2 test tokens. Quoted in the README (*Ties cost INT plans*).
"""
import sys
sys.path.insert(0, "bench")
import bitalloc
from bitalloc.api import plan_from_table, profile, resolve_calibration
from bitalloc.constraints import Constraints
from bitalloc.models import select_modules
from bitalloc.options import default_options
from common import DATA, with_options
loaded = bitalloc.load_model("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
model = loaded.model
calib = resolve_calibration(str(DATA / "wiki.valid.tokens"), loaded, 512, 8192, seed=0)
names = select_modules(model)
table = profile(loaded, calib, names, default_options(), cache_dir=bitalloc.api.default_cache_dir(), progress=False)
windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(str(DATA / "wiki.test.raw")), loaded.tokenizer, 512, 16)
reference = bitalloc.reference_logprobs(model, windows)
for b in (3.5, 4.5):
    for ties in (("fused",), ()):
        p = plan_from_table(table, f"{b}bits", loaded, calib, constraints=Constraints(ties=ties))
        r = with_options(model, p.options_by_module(), lambda m: bitalloc.evaluate(m, windows, reference=reference))
        print(b, ties, "predicted %.4f" % p.summary.predicted_delta_loss, r.describe(), flush=True)
