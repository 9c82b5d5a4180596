"""Convert bench/train_tiny.py's checkpoint to an F32 GGUF with llama.cpp's converter, then check it.

    python bench/convert_tiny.py /work/family2/tiny-qwen2 /work/family2/tiny-qwen2-f32.gguf \
        --converter /path/to/llama.cpp/convert_hf_to_gguf.py

Runs llama.cpp's `convert_hf_to_gguf.py DIR --outtype f32 --outfile OUT` unchanged but for one thing:
transformers (5.x) loads every `qwen2` checkpoint's tokenizer as `Qwen2Tokenizer`, which replaces the
saved tokenizer.json's pre-tokenizer with Qwen2's regex, so the converter's tokenizer fingerprint
matches no known pre-tokenizer and it stops. The model was trained with SmolLM2's tokenizer exactly
as saved (GPT-2 byte-level pre-tokenizer, llama.cpp's "smollm"), so the converter is given that
tokenizer (`TokenizersBackend`, the saved tokenizer.json verbatim) and writes `tokenizer.ggml.pre =
smollm`, as SmolLM2's own GGUF has.

Then loads the GGUF as the benchmarks do (`bitalloc.models.load_model`) and the checkpoint, and prints
both perplexities on the same token windows (WikiText-2 test, 16 × 512, SmolLM2's tokenizer).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT  # noqa: E402

CONVERTER = ROOT / "bench" / "llama_cpp" / "src" / "convert_hf_to_gguf.py"  # the source tree bench/llama_cpp/build.sh unpacks


def convert(checkpoint: Path, out: Path, converter: Path) -> None:
    import transformers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    auto = transformers.AutoTokenizer.from_pretrained

    def saved_tokenizer(name, *args, **kwargs):  # the checkpoint's tokenizer.json as saved, not Qwen2Tokenizer
        if Path(str(name)).resolve() == checkpoint.resolve():
            return TokenizersBackend.from_pretrained(str(name), *args, **kwargs)
        return auto(name, *args, **kwargs)

    transformers.AutoTokenizer.from_pretrained = saved_tokenizer
    argv = sys.argv
    sys.argv = [str(converter), str(checkpoint), "--outtype", "f32", "--outfile", str(out)]
    sys.path.insert(0, str(converter.parent))
    try:
        runpy.run_path(str(converter), run_name="__main__")
    finally:
        sys.argv = argv
        transformers.AutoTokenizer.from_pretrained = auto


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="folder written by bench/train_tiny.py")
    ap.add_argument("out", help="the .gguf to write")
    ap.add_argument("--converter", default=str(CONVERTER), help="llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--tokenizer-gguf", default=str(ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=str(DATA / "wiki.test.raw"))
    args = ap.parse_args()
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    convert(checkpoint, out, Path(args.converter))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitalloc.calibration import read_text
    from bitalloc.evaluate import evaluate, evaluation_windows
    from bitalloc.models import load_model

    torch.set_num_threads(1)
    gguf = Path(args.tokenizer_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = read_text(args.text)
    windows = evaluation_windows(text, tokenizer, 512, 16)
    loaded = load_model(str(out))
    own = evaluation_windows(text, loaded.tokenizer, 512, 16)
    hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    ppl_hf = evaluate(hf, windows).ppl
    ppl_gguf = evaluate(loaded.model, windows).ppl
    print(f"{out.name}: {type(loaded.model).__name__}; WikiText-2 test ppl (16 × 512): checkpoint {ppl_hf:.4f}, "
          f"GGUF {ppl_gguf:.4f} (rel. diff {abs(ppl_gguf / ppl_hf - 1):.1e}); the GGUF's own tokenizer "
          f"({type(loaded.tokenizer).__name__}) gives {'the same' if torch.equal(own, windows) else 'DIFFERENT'} windows")


if __name__ == "__main__":
    main()
