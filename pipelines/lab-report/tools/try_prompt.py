#!/usr/bin/env python3
"""Try the lab-report prompt on the real demo model, one candidate line at a time.

Renders ../prompt.j2 for each candidate line, runs the GGUF greedily with llama.cpp
(llama-cpp-python) the way the pipeline does (stop at the first newline, 64 new tokens),
and prints line -> answer. With --gold it scores the answers as the model gave them.

Candidates come from --candidates (JSONL, one object per line with "doc", "start", "end",
"line") and otherwise from a simple line split of examples/lab-reports/*.txt. Answers can be
written with --answers-out; --score-items scores items (JSONL of {"doc", "start", "item"})
against --gold without running the model.

Gold: JSONL with doc, start and the expected test, value, unit, ref_low, ref_high.
Needs llama-cpp-python and jinja2 (both in ~/.cache/medbatch/refvenv). Prints document
text: use it on the invented example reports, not on patient data.
"""

import argparse
import json
import pathlib
import re
import time

HERE = pathlib.Path(__file__).resolve().parent
PIPELINE_DIR = HERE.parent
REPO = PIPELINE_DIR.parent.parent
DEFAULT_MODEL = pathlib.Path.home() / ".cache/medbatch/models/gemma-3-270m-q4_k_m.gguf"
DEFAULT_EXAMPLES = REPO / "examples/lab-reports"

# The answer opening the prompt already wrote (lab_report::ANSWER_PRIMER).
PRIMER = '{"test":"'
N_CTX = 1024
N_THREADS = 2
MAX_TOKENS = 64  # pipeline.toml [generation] max_new_tokens
STOP = ["\n"]  # pipeline.toml [generation] stop
SCORED = ("test", "value", "unit", "ref_low", "ref_high")
QUALITATIVE = re.compile(r"(?i)\b(negative|positive|trace|detected|reactive|yellow|clear|cloudy|many|few)\b")


def simple_candidates(folder):
    """One candidate per non-blank line with a digit or a qualitative word."""
    for path in sorted(folder.glob("*.txt")):
        offset = 0
        for raw in path.read_text(encoding="utf-8").splitlines(keepends=True):
            line = raw.strip()
            if line and (re.search(r"\d", line) or QUALITATIVE.search(line)):
                start = offset + (len(raw) - len(raw.lstrip()))
                yield {"doc": path.name, "start": start, "end": start + len(line), "line": line}
            offset += len(raw)


def number(s):
    """A plain number, decimal comma allowed (lab_report::parse_value, simplified)."""
    if s is None or isinstance(s, bool):
        return None
    if isinstance(s, (int, float)):
        return float(s)
    s = s.strip()
    if not re.fullmatch(r"-?\d+(?:[.,]\d+)?", s):
        return None
    return float(s.replace(",", "."))


def first_object(answer):
    """The answer's first JSON object and a verdict label (as lab_report::AnswerError)."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(answer)
    except json.JSONDecodeError as e:
        return None, "truncated_answer" if e.pos >= len(answer) - 1 else "unparseable_answer"
    if not isinstance(obj, dict):
        return None, "unparseable_answer"
    if obj.get("value") in (None, "", "null"):
        return obj, "missing_value"
    return obj, "ok"


def same_text(a, b):
    norm = lambda s: re.sub(r"^the\s+", "", str(s).strip().strip(":").lower())
    if a is None or b is None:
        return a is None and b is None
    return norm(a) == norm(b) or (number(a) is not None and number(a) == number(b))


def same_bound(a, b):
    return number(a) == (float(b) if b is not None else None)


def score(results, gold):
    """results: {(doc, start): dict or None}. Prints per-field counts over gold lines."""
    right = {f: 0 for f in SCORED}
    all_right = 0
    for key, g in gold.items():
        got = results.get(key) or {}
        ok = {
            f: (same_bound(got.get(f), g[f]) if f.startswith("ref_") else same_text(got.get(f), g[f]))
            for f in SCORED
        }
        for f, v in ok.items():
            right[f] += v
        all_right += all(ok.values())
    n = len(gold)
    print("fields right:", ", ".join(f"{f} {v}/{n}" for f, v in right.items()), f"; all five {all_right}/{n}")


def load_jsonl(path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL)
    ap.add_argument("--prompt", type=pathlib.Path, default=PIPELINE_DIR / "prompt.j2")
    ap.add_argument("--candidates", type=pathlib.Path, help="JSONL of candidates (doc, start, end, line)")
    ap.add_argument("--examples", type=pathlib.Path, default=DEFAULT_EXAMPLES)
    ap.add_argument("--gold", type=pathlib.Path, help="JSONL: doc, start, test, value, unit, ref_low, ref_high")
    ap.add_argument("--answers-out", type=pathlib.Path, help="write candidates with the answers here")
    ap.add_argument("--score-items", type=pathlib.Path, help="score items printed by parse_model_answers; no model run")
    ap.add_argument("--limit", type=int, default=0, help="stop after this many lines")
    args = ap.parse_args()
    gold = {(g["doc"], g["start"]): g for g in load_jsonl(args.gold)} if args.gold else {}

    if args.score_items:
        items = load_jsonl(args.score_items)
        errors = {}
        for it in items:
            if it.get("error"):
                errors[it["error"]] = errors.get(it["error"], 0) + 1
        print(f"{len(items)} answers; refused: {errors or 'none'}")
        if gold:
            score({(it["doc"], it["start"]): it.get("item") for it in items}, gold)
        return

    import jinja2
    from llama_cpp import Llama

    source = args.prompt.read_text(encoding="utf-8")
    template = jinja2.Template(source, keep_trailing_newline=True)
    prefix = source[: source.index("{{ line }}")]
    llm = Llama(model_path=str(args.model), n_ctx=N_CTX, n_threads=N_THREADS, n_batch=512, verbose=False)
    print(f"prompt prefix: {len(llm.tokenize(prefix.encode('utf-8'), add_bos=True))} tokens (with BOS)")

    cands = load_jsonl(args.candidates) if args.candidates else list(simple_candidates(args.examples))
    if args.limit:
        cands = cands[: args.limit]
    verdicts, results, records = {}, {}, []
    max_out = 0
    started = time.time()
    for c in cands:
        out = llm.create_completion(
            template.render(line=c["line"]), max_tokens=MAX_TOKENS, temperature=0.0, top_k=1, stop=STOP
        )
        choice = out["choices"][0]
        max_out = max(max_out, out["usage"]["completion_tokens"])
        answer = PRIMER + choice["text"]
        obj, verdict = first_object(answer)
        if choice["finish_reason"] == "length":
            verdict += "+hit_max_tokens"
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        results[(c["doc"], c["start"])] = obj if verdict.startswith("ok") else None
        records.append({**c, "answer": answer})
        print(f"{c['doc'][:24]:24} | {c['line']}\n{'':24} -> {answer.strip()}  [{verdict}]", flush=True)

    print(f"\n{len(cands)} lines in {time.time() - started:.0f} s; longest answer {max_out} tokens")
    print("verdicts:", ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())))
    if gold:
        print("as answered by the model:")
        score(results, gold)
    if args.answers_out:
        args.answers_out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    main()
