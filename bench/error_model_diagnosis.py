"""Where the additive fisher prediction and measured loss part ways, module by module, at Q3_K_S's size.

Plans the imatrix candidate table at 4.2344 bits per weight (llama.cpp Q3_K_S's, over SmolLM2's decoder
linears) and compares it with the hand mix IQ4_NL everywhere + Q3_K on ffn_down (the same size): both
plans' predicted and measured ΔNLL/KL on 4 held-back calibration windows, then each module where they
differ swapped alone into the hand mix: predicted vs measured change (what led to the token-weighted
Hessian H_a of profile/statistics.py).

    python bench/error_model_diagnosis.py [BASE_GGUF]
"""
from pathlib import Path
import sys, torch, math, numpy as np
from bitalloc import api
from bitalloc.models import load_model, weight_matrix
from bitalloc.options import QuantOption
from bitalloc.quantizers import quantize_weight
from bitalloc.profile.statistics import input_importance
from bitalloc.evaluate import evaluate, reference_logprobs
torch.set_num_threads(2)
BASE = sys.argv[1] if len(sys.argv) > 1 else "bench/llama_cpp/work/SmolLM2-135M-Instruct.Q4_1/f32-embf16.gguf"
TYPES = "Q8_0,Q5_0,Q4_0,IQ4_NL,Q6_K,Q5_K,Q4_K,IQ4_XS,Q3_K,Q2_K".split(",")
options = [QuantOption.gguf(t) for t in TYPES] + [QuantOption.keep()]
table, loaded, calib = api.prepare(load_model(BASE), str(Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"), options=options,
                                   calib_tokens=8192, seq_len=512, quantizer="imatrix", cache_dir=True)
plan = api.plan_from_table(table, "4.2344bits", loaded, calib)
model = loaded.model.eval()
imp = input_importance(model, list(table.groups), calib.tokens)
orig = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in table.groups}
tokens = calib.held_out[-4:]
ref = reference_logprobs(model, tokens); ref_nll = evaluate(ref, tokens).nll
cache = {}
def q(n, o):
    if (n, o) not in cache:
        cache[n, o] = quantize_weight(orig[n], o, "imatrix", hessian=imp[n]).values if o.fmt != "keep" else orig[n]
    return cache[n, o]
def load(assign):
    with torch.no_grad():
        for n in table.groups: weight_matrix(model.get_submodule(n)).copy_(q(n, assign[n]))
def measure(assign):
    load(assign); r = evaluate(model, tokens, reference=ref); return r.nll - ref_nll, float(r.kl)
hand = {n: QuantOption.gguf("Q3_K" if n.endswith("down_proj") else "IQ4_NL") for n in table.groups}
P = plan.options_by_module()
E = table.errors["fisher"]
def pred(assign): return sum(E[g, table.option_index(assign[n])] for g, n in enumerate(table.groups))
h = measure(hand); p = measure(P)
print("hand pred", round(pred(hand), 4), "meas dNLL/KL", [round(x, 4) for x in h])
print("plan pred", round(pred(P), 4), "meas dNLL/KL", [round(x, 4) for x in p], flush=True)
for g, n in enumerate(table.groups):
    if P[n] == hand[n]: continue
    a = dict(hand); a[n] = P[n]
    m = measure(a)
    dp = E[g, table.option_index(P[n])] - E[g, table.option_index(hand[n])]
    print(f"{n:40s} {hand[n].label}->{P[n].label:7s} pred {dp:+.5f} meas dNLL {m[0]-h[0]:+.5f} KL {m[1]-h[1]:+.5f}", flush=True)
