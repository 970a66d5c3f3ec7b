"""The model card's quickstart, runnable as written, on CPU or GPU, with torchrun or plain python:

    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir 7B_200B_4/ \
        --tokenizer_path tokenizer.model --max_seq_len 128 --max_batch_size 2

No fairscale and no process group: model-parallel shards are merged on load, so one process runs
any released checkpoint.
"""

import argparse
import os

from multitoken import Llama

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import numpy as np\n\ndef cosine_similarity(a, b):\n    ",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="checkpoint folder, e.g. 7B_200B_4/")
    parser.add_argument("--tokenizer_path", required=True, help="tokenizer.model")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--max_batch_size", type=int, default=4)
    parser.add_argument("--max_gen_len", type=int, default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    a = parser.parse_args()

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise SystemExit("run with --nproc_per_node 1: every process would hold the whole (merged) model")
    device = a.device
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"

    generator = Llama.build(
        ckpt_dir=a.ckpt_dir,
        tokenizer_path=a.tokenizer_path,
        max_seq_len=a.max_seq_len,
        max_batch_size=a.max_batch_size,
        device=device,
        dtype=a.dtype,
    )
    prompts = PROMPTS[: a.max_batch_size]
    results = generator.text_completion(
        prompts, max_gen_len=a.max_gen_len, temperature=a.temperature, top_p=a.top_p
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    main()
