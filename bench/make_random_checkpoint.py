#!/usr/bin/env python3
"""Writes a random-weight Gemma 3 text checkpoint of a chosen size, with the fixture tokenizer,
for speed measurements that need more than the tiny test models (`medbatch bench --tp`).

    python3 -m pip install torch transformers safetensors     # torch 2.15.0, transformers 5.23.0 used
    python3 bench/make_random_checkpoint.py /tmp/gemma3-mid   # from the repository root

Default shape (about 0.4 B parameters, f32): hidden 1,536, 12 layers (pattern 6: 2 global),
12 heads / 4 KV heads of 128, MLP 6,144, the fixture's 512-token vocabulary (so the weights are
the decoder's, not the embedding's), window 1,024.
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--hidden", type=int, default=1536)
p.add_argument("--layers", type=int, default=12)
p.add_argument("--heads", type=int, default=12)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--intermediate", type=int, default=6144)
a = p.parse_args()
root = Path(__file__).resolve().parent.parent
cfg = Gemma3TextConfig(vocab_size=512, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       head_dim=128, query_pre_attn_scalar=128, sliding_window=1024, max_position_embeddings=8192,
                       attn_implementation="eager", dtype="float32")
torch.manual_seed(0)
model = Gemma3ForCausalLM(cfg).eval()
with torch.no_grad():
    for name, t in model.named_parameters():
        if name.endswith("norm.weight"):
            t.copy_(torch.randn(t.shape) * 0.1)
        else:
            t.copy_(torch.randn(t.shape) / t.shape[-1] ** 0.5)
out = Path(a.out)
model.save_pretrained(str(out), safe_serialization=True)
for f in (root / "tests/fixtures/hf/tokenizer").iterdir():
    shutil.copy(f, out / f.name)
print(f"{sum(t.numel() for t in model.parameters()) / 1e9:.2f} B parameters in {out}")
