#!/usr/bin/env python3
# llama.cpp speed baseline for the Gemma 3 270M Q4_K_M demo model on this machine's CPU.
#
#   pp512: prompt tokens/s for one 512-token prompt evaluated as a single batch
#          (n_batch = n_ubatch = 512), in a fresh context each run.
#   tg128: generated tokens/s for 128 greedy single-token evals after a 16-token prompt
#          (argmax of the last logits in numpy, no sampler), fresh context each run.
# Each is the median of RUNS runs. Before each run the script records the 1-minute load
# average (which counts this script's own threads from the previous run) and the share of CPU
# time used over the last second, and during each run the share of CPU time other processes
# took (/proc/stat busy time minus this process's CPU time). The machine is shared, so
# numbers taken under foreign load are low (5-8x slower has been seen) and should be rerun.
# Each run first waits up to BENCH_IDLE_WAIT_S (default 180) seconds for CPU use < 10%.
#
# Pinned: llama-cpp-python==0.3.36 built from source with
#   CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF"
# Run:
#   ~/.cache/medbatch/refvenv/bin/python bench/llamacpp_speed.py [GGUF_PATH]
# (or set MEDBATCH_DEMO_GGUF). Prints one JSON line, then one human-readable line.
import json
import os
import statistics
import sys
import time

import numpy as np

import llama_cpp

THREADS = 2
RUNS = 3
PP_TOKENS = 512
TG_TOKENS = 128
TG_PROMPT_TOKENS = 16
N_CTX = 1024
CPU_SAMPLE_S = 1.0
# Before each run, wait up to this long for other processes' CPU use to drop below
# IDLE_BUSY_PCT (0 disables waiting). The state at the start of the run is recorded either way.
IDLE_WAIT_S = float(os.environ.get("BENCH_IDLE_WAIT_S", "180"))
IDLE_BUSY_PCT = 10.0
DEFAULT_GGUF = "~/.cache/medbatch/models/gemma-3-270m-q4_k_m.gguf"

TEXT = (
    "The patient was admitted with shortness of breath and bilateral leg swelling. "
    "Blood pressure was 152/94 mmHg, heart rate 104 bpm, and oxygen saturation 91% on room air. "
    "Laboratory results showed sodium 134 mmol/L, potassium 5.2 mmol/L, and creatinine 1.8 mg/dL. "
    "The chest radiograph showed cardiomegaly with small bilateral pleural effusions. "
)


def read_proc_stat():
    """(idle, total) CPU time over all CPUs, in clock ticks."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return vals[3] + vals[4], sum(vals)  # idle + iowait, total


def cpu_busy_share(seconds):
    """Fraction of all CPU time that was not idle over `seconds`."""
    i0, t0 = read_proc_stat()
    time.sleep(seconds)
    i1, t1 = read_proc_stat()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


class ForeignLoad:
    """Share of all CPU time used by other processes while the block runs: busy time from
    /proc/stat minus this process's own CPU time (all threads)."""

    def __enter__(self):
        self.stat = read_proc_stat()
        self.own = sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        i1, t1 = read_proc_stat()
        own = (sum(os.times()[:2]) - self.own) * os.sysconf("SC_CLK_TCK")
        total = max(t1 - self.stat[1], 1)
        busy = total - (i1 - self.stat[0])
        self.pct = round(100 * max(busy - own, 0) / total, 1)
        return False


def load_state():
    """Waits (bounded) for the machine to go idle, then records the load seen just before the run."""
    start = time.monotonic()
    while True:
        busy = 100 * cpu_busy_share(CPU_SAMPLE_S)
        waited = time.monotonic() - start
        if busy < IDLE_BUSY_PCT or waited >= IDLE_WAIT_S:
            return {
                "loadavg_1m": round(os.getloadavg()[0], 2),
                "cpu_busy_pct": round(busy, 1),
                "waited_s": round(waited, 1),
            }


def new_llm(path):
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        n_batch=PP_TOKENS,
        n_ubatch=PP_TOKENS,
        seed=0,
        logits_all=False,
        verbose=False,
    )


def prompt_ids(llm, n):
    ids = llm.tokenize(TEXT.encode(), add_bos=True)
    while len(ids) < n:
        ids += llm.tokenize(TEXT.encode(), add_bos=False)
    return ids[:n]


def last_logits(llm):
    ptr = llm._ctx.get_logits_ith(-1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def run_pp(path):
    llm = new_llm(path)
    ids = prompt_ids(llm, PP_TOKENS)
    with ForeignLoad() as load:
        t = time.perf_counter()
        llm.eval(ids)
        dt = time.perf_counter() - t
    del llm
    return PP_TOKENS / dt, load.pct


def run_tg(path):
    llm = new_llm(path)
    llm.eval(prompt_ids(llm, TG_PROMPT_TOKENS))
    with ForeignLoad() as load:
        t = time.perf_counter()
        for _ in range(TG_TOKENS):
            llm.eval([int(np.argmax(last_logits(llm)))])
        dt = time.perf_counter() - t
    del llm
    return TG_TOKENS / dt, load.pct


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MEDBATCH_DEMO_GGUF", DEFAULT_GGUF)
    path = os.path.expanduser(path)
    # Warm-up: page the mmapped weights in and let the thread pool start once.
    warm = new_llm(path)
    warm.eval(prompt_ids(warm, 32))
    del warm

    pp, tg, loads = [], [], []
    for _ in range(RUNS):
        for name, fn, out in (("pp512", run_pp, pp), ("tg128", run_tg, tg)):
            before = load_state()
            rate, foreign = fn(path)
            out.append(rate)
            loads.append({"bench": name, "tok_s": round(rate, 1), **before, "foreign_cpu_pct_during": foreign})

    result = {
        "pp512_tok_s": round(statistics.median(pp), 1),
        "tg128_tok_s": round(statistics.median(tg), 1),
        "threads": THREADS,
        "llama_cpp_python": llama_cpp.__version__,
        "pp512_runs": [round(x, 1) for x in pp],
        "tg128_runs": [round(x, 1) for x in tg],
        "runs": loads,
        "cpus": os.cpu_count(),
        "note": "shared machine: loadavg_1m/cpu_busy_pct are sampled just before each run, "
        "foreign_cpu_pct_during is other processes' share of both CPUs during it; "
        "runs with foreign load well above 0 are contended",
    }
    print(json.dumps(result))
    max_load = max(x["loadavg_1m"] for x in loads)
    max_busy = max(x["cpu_busy_pct"] for x in loads)
    max_foreign = max(x["foreign_cpu_pct_during"] for x in loads)
    print(
        f"llama.cpp {llama_cpp.__version__}, {THREADS} threads: pp512 {result['pp512_tok_s']} tok/s, "
        f"tg128 {result['tg128_tok_s']} tok/s (median of {RUNS}). Shared machine: load avg before "
        f"runs up to {max_load}, CPU busy before up to {max_busy}%, other processes' CPU share "
        f"during runs up to {max_foreign}%"
    )


if __name__ == "__main__":
    main()
