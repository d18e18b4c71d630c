#!/usr/bin/env python3
"""Check the lab-report gold files against their reports (no dependencies).

The gold set has two splits: dev/ (tuned on) and test/ (held out). In each, for every
gold/<name>.json: document_id names reports/<document_id>; every evidence is an
exact substring of the report, occurring exactly once; every value occurs inside its
evidence; evidence spans (first occurrence) of one document do not overlap; fields have
the documented types; a flag left to computation agrees with value and range. An optional
non_results list marks the lines and phrases with a number or a result word that are no result:
each has a known kind and an evidence occurring exactly once that overlaps no other evidence span.
Also checks that no (test, value) pair of prompt.j2 or examples/lab-reports/ is reused, and
that no line of a test/ report occurs in a dev/ report or in the pipeline's files (the held-out
split stays unseen). `python3 check_gold.py [dev|test]` checks one split. Exit status 1 on any
problem.
"""
import json
import pathlib
import re
import sys

EVAL = pathlib.Path(__file__).resolve().parent
PIPELINE = EVAL.parent
REPO = PIPELINE.parent.parent
FLAGS = {"low", "high", "normal", "abnormal", "critical", None}
KEYS = ["test", "value", "unit", "ref_low", "ref_high", "flag", "evidence"]
NON_RESULT_KINDS = {"metadata", "pending", "cancelled", "not_reported", "previous", "target",
                    "interpretation", "vital_sign", "medication", "other"}


def norm_test(s):
    return re.sub(r"[\s.,]", "", s).lower()


def norm_value(s):
    return re.sub(r"\s", "", s.strip().lower().replace(",", "."))


def main():
    splits = sys.argv[1:] or ["dev", "test"]
    problems = []
    for split in splits:
        check_split(EVAL / split, problems)
    if "test" in splits:
        check_held_out(problems)
    for p in problems:
        print("PROBLEM:", p)
    print("OK" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def lines_of(paths):
    out = set()
    for p in paths:
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            # Short lines (blank, "HEMATOLOGY", a date) may legitimately recur.
            if len(line) >= 25:
                out.add(line)
    return out


def check_held_out(problems):
    """No line of a test/ report in dev/ reports or in the pipeline's own files."""
    seen = lines_of(sorted((EVAL / "dev" / "reports").glob("*.txt")))
    seen |= lines_of(p for p in sorted(PIPELINE.rglob("*")) if p.is_file() and "eval" not in p.relative_to(PIPELINE).parts)
    for report in sorted((EVAL / "test" / "reports").glob("*.txt")):
        for line in sorted(lines_of([report]) & seen):
            problems.append(f"test/reports/{report.name}: line also in dev or the pipeline: {line[:60]!r}")
    dev = {p.name for p in (EVAL / "dev" / "reports").glob("*.txt")}
    for name in sorted(dev & {p.name for p in (EVAL / "test" / "reports").glob("*.txt")}):
        problems.append(f"{name}: in both dev and test")


def check_split(root, problems):
    reports = sorted(p.name for p in (root / "reports").glob("*.txt"))
    golds = sorted((root / "gold").glob("*.json"))
    if [g.stem + ".txt" for g in golds] != reports:
        problems.append(f"reports and gold files differ: {reports} vs {[g.name for g in golds]}")
    # (test, value) pairs the prompt examples and the example reports use.
    used = set()
    prompt = (PIPELINE / "prompt.j2").read_text(encoding="utf-8")
    for m in re.finditer(r'JSON: (\{.*\})', prompt):
        if "{{" not in m.group(1):
            a = json.loads(m.group(1))
            used.add((norm_test(a["test"]), norm_value(a["value"])))
    example_text = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "examples/lab-reports").glob("*"))
    total = 0
    for g in golds:
        doc = json.loads(g.read_text(encoding="utf-8"))
        name = doc.get("document_id")
        if name != g.stem + ".txt":
            problems.append(f"{g.name}: document_id {name!r}")
            continue
        text = (root / "reports" / name).read_text(encoding="utf-8")
        spans = []
        for i, r in enumerate(doc["results"]):
            where = f"{name}#{i} {r.get('test')!r}"
            if list(r) != KEYS:
                problems.append(f"{where}: keys {list(r)}")
            ev, value = r["evidence"], r["value"]
            if not isinstance(value, str) or not isinstance(r["test"], str):
                problems.append(f"{where}: test/value not strings")
            if r["unit"] is not None and not isinstance(r["unit"], str):
                problems.append(f"{where}: unit not string/null")
            for k in ("ref_low", "ref_high"):
                if r[k] is not None and not isinstance(r[k], (int, float)):
                    problems.append(f"{where}: {k} not a number/null")
            if r["flag"] not in FLAGS:
                problems.append(f"{where}: flag {r['flag']!r}")
            n = text.count(ev)
            if n != 1:
                problems.append(f"{where}: evidence occurs {n} times")
                continue
            if value not in ev:
                problems.append(f"{where}: value {value!r} not in evidence")
            # A name wrapped over two lines is in its evidence with a line break inside.
            if " ".join(r["test"].lower().split()) not in " ".join(ev.lower().split()):
                problems.append(f"{where}: test not in evidence")
            if r["unit"] is not None and r["unit"] not in ev:
                problems.append(f"{where}: unit not in evidence")
            start = text.find(ev)
            spans.append((start, start + len(ev), where))
            if re.fullmatch(r"-?\d+(?:[.,]\d+)?", value):
                v = float(value.replace(",", "."))
                lo, hi = r["ref_low"], r["ref_high"]
                if lo is not None or hi is not None:
                    c = "low" if lo is not None and v < lo else "high" if hi is not None and v > hi else "normal"
                    if r["flag"] in ("low", "high", "normal") and r["flag"] != c:
                        problems.append(f"{where}: flag {r['flag']} but value/range say {c}")
            key = (norm_test(r["test"]), norm_value(value))
            if key in used:
                problems.append(f"{where}: (test, value) used in prompt.j2")
            if re.search(re.escape(r["test"]) + r"\W{1,40}?" + re.escape(value) + r"(?![\d.,])", example_text, re.I):
                problems.append(f"{where}: (test, value) occurs in examples/lab-reports")
            total += 1
        check_non_results(doc, name, text, spans, problems)
        spans.sort()
        for (s1, e1, w1), (s2, e2, w2) in zip(spans, spans[1:]):
            if s2 < e1:
                problems.append(f"{w1} and {w2}: evidence spans overlap")
        print(f"{root.name}/{name}: {len(doc['results'])} results, {len(doc.get('non_results', []))} non-results")
    print(f"{root.name}: {total} gold results in {len(golds)} documents")


def check_non_results(doc, name, text, spans, problems):
    """non_results (optional): kind from NON_RESULT_KINDS, note only with other, evidence once in the
    report; its span is added to spans, so the overlap check covers results and non-results alike."""
    if "non_results" not in doc:
        return
    if list(doc) != ["document_id", "results", "non_results"]:
        problems.append(f"{name}: keys {list(doc)}")
    items = doc["non_results"]
    if not isinstance(items, list):
        problems.append(f"{name}: non_results not a list")
        return
    for i, nr in enumerate(items):
        where = f"{name} non_results#{i}"
        if not isinstance(nr, dict) or not isinstance(nr.get("evidence"), str) or not nr["evidence"]:
            problems.append(f"{where}: not an object with an evidence string")
            continue
        where += f" {nr['evidence'][:40]!r}"
        kind = nr.get("kind")
        if kind not in NON_RESULT_KINDS:
            problems.append(f"{where}: kind {kind!r}")
        keys = ["kind", "evidence", "note"] if kind == "other" else ["kind", "evidence"]
        if list(nr) != keys:
            problems.append(f"{where}: keys {list(nr)}, expected {keys}")
        if "note" in nr and not (isinstance(nr["note"], str) and nr["note"].strip()):
            problems.append(f"{where}: note not a non-empty string")
        ev = nr["evidence"]
        n = text.count(ev)
        if n != 1:
            problems.append(f"{where}: evidence occurs {n} times")
            continue
        start = text.find(ev)
        spans.append((start, start + len(ev), where))


if __name__ == "__main__":
    sys.exit(main())
