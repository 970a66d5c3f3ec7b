"""Conversions between our Meta-format models and other formats (docs/interop.md):

- `multitoken.convert.hf`: Hugging Face `LlamaForCausalLM` folders in (`from_hf`) and out (`to_hf`,
  the extra heads beside it in `mtp_heads.safetensors`);
- `multitoken.convert.gguf`: GGUF (llama.cpp) Llama models in (`from_gguf`);
- `multitoken.convert.meta`: ours to ours, shards merged and the dtype changed (`recast`).

The submodules import their optional dependencies (safetensors, transformers, gguf) when used.
"""
