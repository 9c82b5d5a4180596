"""Token-weighted input Hessian for the fisher error model: a probe, not yet the product's estimator.

The fisher error model predicts ½ Σ_o F_o (ΔW H ΔWᵀ)_oo with F the mean squared output gradient per row
and H = mean_t x_t x_tᵀ: it assumes a token's gradient size is independent of its input. SmolLM2's
massive activations break that (huge x_t on tokens whose gradient is tiny), so some modules' errors are
predicted far too large (bench/error_model_diagnosis.py: layers.11.mlp.down_proj at Q3_K, 0.39 nats
predicted, ~0.03 measured) and the planner buys them bits with Q2_K elsewhere. Weighting each token by its
squared output gradient a_t = Σ_o g_to² (H_g = Σ_t a_t x_t x_tᵀ / Σ_t a_t, the rank-1 split of the
per-token Fisher) keeps that correlation. This script rebuilds the fisher column of the imatrix
candidate table with H_g, re-plans at llama.cpp's mix sizes and scores each plan on 8 × 512 WikiText-2
test windows (base: bench/peers.py's F32 GGUF with an F16 token embedding).

    python bench/token_weighted_hessian.py [BASE_GGUF]
"""
from pathlib import Path
import sys, torch, math, copy, time, numpy as np
from torch import nn
from collections import Counter
from bitalloc import api
from bitalloc.models import load_model, weight_matrix
from bitalloc.options import QuantOption
from bitalloc.quantizers import quantize_weight
from bitalloc.calibration import read_text
from bitalloc.evaluate import evaluation_windows
from bitalloc.quantizers.materialize import quantize_model
torch.set_num_threads(2)
DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'wikitext2'
BASE = sys.argv[1] if len(sys.argv) > 1 else "bench/llama_cpp/work/SmolLM2-135M-Instruct.Q4_1/f32-embf16.gguf"
TYPES = "Q8_0,Q5_0,Q4_0,IQ4_NL,Q6_K,Q5_K,Q4_K,IQ4_XS,Q3_K,Q2_K".split(",")
options = [QuantOption.gguf(t) for t in TYPES] + [QuantOption.keep()]
table, loaded, calib = api.prepare(load_model(BASE), str(DATA / "wiki.valid.tokens"), options=options,
                                   calib_tokens=8192, seq_len=512, quantizer="imatrix", cache_dir=True)
model = loaded.model.eval()
names = list(table.groups)
mods = {n: model.get_submodule(n) for n in names}
H = {n: 0 for n in names}; Hg = {n: 0 for n in names}; A = {n: 0.0 for n in names}; F = {n: 0 for n in names}
xs = {}
def fh(n):
    def hook(m, args, out):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float(); xs[n] = x
        def gh(g, n=n):
            g2 = (g.detach().float() ** 2).reshape(-1, g.shape[-1])
            a = g2.sum(1)
            x = xs[n]
            Hg[n] = Hg[n] + (x * a[:, None]).T @ x; A[n] += float(a.sum())
            H[n] = H[n] + x.T @ x; F[n] = F[n] + g2.sum(0)
        out.register_hook(gh)
    return hook
hs = [m.register_forward_hook(fh(n)) for n, m in mods.items()]
emb = model.get_input_embeddings(); hs.append(emb.register_forward_hook(lambda m, a, o: o.requires_grad_(True)))
for p in model.parameters(): p.requires_grad_(False)
t = time.time()
for w in calib.tokens:
    ids = w[None]; logits = model(input_ids=ids).logits
    nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").backward()
for h in hs: h.remove()
print("stats", round(time.time() - t), flush=True)
n_tok = calib.tokens.numel(); n_pred = calib.tokens.shape[0] * (calib.tokens.shape[1] - 1)
new = np.array(table.errors["fisher"], copy=True)
t = time.time()
for g, n in enumerate(names):
    w = weight_matrix(mods[n]).detach().float()
    Hm = H[n] / n_tok; Hgm = Hg[n] / A[n]; f = F[n] / n_pred
    for k, o in enumerate(table.options):
        if np.isnan(new[g, k]): continue
        dw = quantize_weight(w, o, "imatrix", hessian=Hm).values - w if o.fmt != "keep" else torch.zeros_like(w)
        new[g, k] = 0.5 * float((((dw @ Hgm) * dw).sum(1)) @ f)
print("errors", round(time.time() - t), flush=True)
tg = copy.deepcopy(table); tg.errors["fisher"] = new
win = evaluation_windows(read_text(str(DATA / "wiki.test.raw")), loaded.tokenizer, 512, 8)
def ppl(opts):
    m = load_model(BASE).model
    quantize_model(m, opts, "imatrix", calib.tokens)
    nll = []
    with torch.no_grad():
        for w in win:
            lp = torch.log_softmax(m(input_ids=w[None]).logits[0, :-1].float(), -1)
            nll.append(-lp.gather(1, w[1:, None]).mean())
    return math.exp(float(torch.stack(nll).mean()))
for b in ["4.2344bits", "4.6344bits", "5.2771bits", "5.5344bits"]:
    for label, tab in (("H_g", tg),) + ((("H", table),) if b != "4.2344bits" else ()):
        plan = api.plan_from_table(tab, b, loaded, calib)
        opts = plan.options_by_module()
        print(b, label, dict(Counter(o.label for o in opts.values())), "ppl8", round(ppl(opts), 3), flush=True)
