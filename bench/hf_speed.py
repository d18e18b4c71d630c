#!/usr/bin/env python3
"""Speed of Hugging Face transformers on CPU for a random-weight model shaped like Gemma 3
270M (f32 safetensors), and the checkpoint folder for `medbatch bench` to run the same model.

Pinned: torch==2.15.0, transformers==5.23.0 (the versions of tests/fixtures/hf). Run:

    ~/.cache/medbatch/hfvenv/bin/python bench/hf_speed.py [--dir DIR] [--threads 2]
    medbatch bench --model DIR --batch 1 ; medbatch bench --model DIR --batch 8

The model is written once to DIR (default ~/.cache/medbatch/bench/gemma3-270m-random, about
1.1 GB; not part of the repository) with the fixture tokenizer beside it (its ids are a
subset of the model's vocabulary, which is all `medbatch bench` needs). Measured like
`medbatch bench`: prefill of a 512-token prompt, then 128 greedy decode steps with the KV
cache, batch 1 and 8, median of 3; aggregate tokens/s.
"""

import argparse
import json
import pathlib
import shutil
import statistics
import time

import torch
import transformers

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT, GEN, RUNS = 512, 128, 3


def build(dest: pathlib.Path):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, max_position_embeddings=32768, rope_theta=1e6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "norm" in name else 0.02)
    model.save_pretrained(dest, safe_serialization=True)
    tok = REPO / "tests/fixtures/hf/tokenizer"
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(tok / f, dest / f)


def measure(model, batch):
    ids = torch.randint(4, 500, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    pp, tg = [], []
    with torch.no_grad():
        for _ in range(RUNS):
            t = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            pp.append(batch * PROMPT / (time.perf_counter() - t))
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(GEN):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True, logits_to_keep=1)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            tg.append(batch * GEN / (time.perf_counter() - t))
    return statistics.median(pp), statistics.median(tg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=pathlib.Path, default=pathlib.Path.home() / ".cache/medbatch/bench/gemma3-270m-random")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (args.dir / "model.safetensors").is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        build(args.dir)
    torch.set_num_threads(args.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    for batch in (1, 8):
        pp, tg = measure(model, batch)
        print(json.dumps({"impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
                          "threads": args.threads, "batch": batch, "pp512_tok_s": round(pp, 1), "tg128_tok_s": round(tg, 1)}))


if __name__ == "__main__":
    main()
