#!/usr/bin/env python3
"""Check the cohort-facts gold files against their notes (standard library only).

The gold set has two splits: dev/ (may be tuned on) and test/ (held out, only reported on).
In each split every notes/<name>.txt has a gold/<name>.json and the other way round. For every
gold file this checks:

- the keys and types of the cohort-facts answer (docs/cohort-facts.md), plus the gold-only
  keys "kind" (string) and "traps" (list of strings), which the scorer ignores;
- smoking_status and diabetes_type against their enums; diabetes_type null unless diabetes
  is true; lvef_percent and hba1c_percent numbers (or null) in a plausible range;
- medication names in lower case, doses strings or null; diagnoses with a boolean negated, a
  subject of patient or family, an ICD-10 code of the right form or null, and no family entry
  coded with a family-history code (Z80-Z84);
- no two diagnoses alike in (lower-case name, negated, subject), no medication named twice;
- evidence: a key for every asserted field and for every current_medications[i] and
  diagnoses[i], no key for an unknown smoking status, a null scalar or an index past its
  list, and every value an exact, case-sensitive substring of the note without a line break;
  a medication's evidence holds its name (case-insensitive) and its dose as written, and the
  evidence of lvef_percent and hba1c_percent holds the number;
- each note is 10 to 45 lines, UTF-8, with \\n line ends.

Across the splits: no file name is in both, and no line of a test/ note (25 characters or
more, stripped) occurs in a dev/ note, so the held-out notes stay unseen.

Usage: python3 check_gold.py [dev|test]   (default: both). Prints one line per problem and a
summary; exit status 1 on any problem.
"""
import json
import pathlib
import re
import sys

EVAL = pathlib.Path(__file__).resolve().parent
SPLITS = ("dev", "test")

ANSWER_KEYS = ["smoking_status", "diabetes", "diabetes_type", "lvef_percent", "hba1c_percent",
               "current_medications", "diagnoses", "evidence"]
GOLD_ONLY_KEYS = ["kind", "traps"]
SMOKING = {"current", "former", "never", "unknown"}
DIABETES_TYPES = {"type1", "type2", "gestational", "other"}
SUBJECTS = {"patient", "family"}
MEDICATION_KEYS = {"name", "dose"}
DIAGNOSIS_KEYS = {"name", "icd10", "negated", "subject"}
SCALAR_EVIDENCE = ["diabetes", "diabetes_type", "lvef_percent", "hba1c_percent"]
# Letter, two characters, then optionally a dot and up to four characters (ICD-10-CM form).
ICD10 = re.compile(r"[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?")
FAMILY_HISTORY_CODE = re.compile(r"Z8[0-4]")
RANGES = {"lvef_percent": (5, 90), "hba1c_percent": (3, 20)}
NOTE_LINES = (10, 45)
HELD_OUT_MIN_LINE = 25


def main(argv):
    splits = argv[1:] or list(SPLITS)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        print(f"usage: python3 check_gold.py [dev|test]; unknown split(s): {unknown}")
        return 2
    problems = []
    counts = {}
    for split in splits:
        counts[split] = check_split(split, problems)
    if set(splits) == set(SPLITS):
        check_held_out(problems)
    for p in problems:
        print("PROBLEM:", p)
    summary = ", ".join(f"{s}: {n} notes" for s, n in counts.items())
    print(f"{summary}; " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def check_split(split, problems):
    root = EVAL / split
    notes = {p.stem: p for p in sorted((root / "notes").glob("*"))}
    golds = {p.stem: p for p in sorted((root / "gold").glob("*"))}
    for stem, p in notes.items():
        if p.suffix != ".txt":
            problems.append(f"{split}/notes/{p.name}: not a .txt file")
    for stem, p in golds.items():
        if p.suffix != ".json":
            problems.append(f"{split}/gold/{p.name}: not a .json file")
    for stem in sorted(notes.keys() - golds.keys()):
        problems.append(f"{split}/notes/{stem}.txt: no gold file")
    for stem in sorted(golds.keys() - notes.keys()):
        problems.append(f"{split}/gold/{stem}.json: no note")
    texts = {stem: read_note(p, f"{split}/{stem}", problems)
             for stem, p in notes.items() if p.suffix == ".txt"}
    for stem in sorted(texts.keys() & golds.keys()):
        where = f"{split}/{stem}"
        text = texts[stem]
        try:
            gold = json.loads(golds[stem].read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{where}: gold is not valid JSON: {e}")
            continue
        if text is not None:
            check_gold(gold, text, where, problems)
    return len(notes)


def read_note(path, where, problems):
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{where}: note is not UTF-8")
        return None
    if "\r" in raw:
        problems.append(f"{where}: note has \\r line ends")
    n = len(raw.splitlines())
    if not NOTE_LINES[0] <= n <= NOTE_LINES[1]:
        problems.append(f"{where}: note has {n} lines, outside {NOTE_LINES[0]}-{NOTE_LINES[1]}")
    return raw


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_gold(gold, text, where, problems):
    if not isinstance(gold, dict):
        problems.append(f"{where}: gold is not a JSON object")
        return
    keys = list(gold)
    missing = [k for k in ANSWER_KEYS + GOLD_ONLY_KEYS if k not in gold]
    extra = [k for k in keys if k not in ANSWER_KEYS + GOLD_ONLY_KEYS]
    if missing or extra:
        problems.append(f"{where}: missing keys {missing}, unexpected keys {extra}")
        return

    if not isinstance(gold["kind"], str) or not gold["kind"].strip():
        problems.append(f"{where}: kind must be a non-empty string")
    traps = gold["traps"]
    if not isinstance(traps, list) or not traps or not all(isinstance(t, str) and t.strip() for t in traps):
        problems.append(f"{where}: traps must be a non-empty list of non-empty strings")

    smoking = gold["smoking_status"]
    if smoking not in SMOKING:
        problems.append(f"{where}: smoking_status {smoking!r} not in {sorted(SMOKING)}")
    diabetes = gold["diabetes"]
    if diabetes is not None and not isinstance(diabetes, bool):
        problems.append(f"{where}: diabetes {diabetes!r} is not true, false or null")
    dtype = gold["diabetes_type"]
    if dtype is not None:
        if dtype not in DIABETES_TYPES:
            problems.append(f"{where}: diabetes_type {dtype!r} not in {sorted(DIABETES_TYPES)}")
        if diabetes is not True:
            problems.append(f"{where}: diabetes_type {dtype!r} but diabetes is {diabetes!r}")
    for key, (lo, hi) in RANGES.items():
        v = gold[key]
        if v is None:
            continue
        if not is_number(v):
            problems.append(f"{where}: {key} {v!r} is not a number or null")
        elif not lo <= v <= hi:
            problems.append(f"{where}: {key} {v} outside {lo}-{hi}")

    meds = gold["current_medications"]
    if not isinstance(meds, list):
        problems.append(f"{where}: current_medications is not a list")
        meds = []
    seen_meds = set()
    for i, m in enumerate(meds):
        w = f"{where} current_medications[{i}]"
        if not isinstance(m, dict) or set(m) != MEDICATION_KEYS:
            problems.append(f"{w}: must be an object with keys {sorted(MEDICATION_KEYS)}")
            continue
        name, dose = m["name"], m["dose"]
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{w}: name must be a non-empty string")
            continue
        if name != name.lower() or name != name.strip():
            problems.append(f"{w}: name {name!r} must be lower case without outer spaces")
        if dose is not None and (not isinstance(dose, str) or not dose.strip()):
            problems.append(f"{w}: dose {dose!r} must be a non-empty string or null")
        if name in seen_meds:
            problems.append(f"{w}: medication {name!r} listed twice")
        seen_meds.add(name)

    dxs = gold["diagnoses"]
    if not isinstance(dxs, list):
        problems.append(f"{where}: diagnoses is not a list")
        dxs = []
    seen_dx = set()
    for i, d in enumerate(dxs):
        w = f"{where} diagnoses[{i}]"
        if not isinstance(d, dict) or set(d) != DIAGNOSIS_KEYS:
            problems.append(f"{w}: must be an object with keys {sorted(DIAGNOSIS_KEYS)}")
            continue
        if not isinstance(d["name"], str) or not d["name"].strip():
            problems.append(f"{w}: name must be a non-empty string")
            continue
        code = d["icd10"]
        if code is not None and (not isinstance(code, str) or not ICD10.fullmatch(code)):
            problems.append(f"{w}: icd10 {code!r} is not an ICD-10 code or null")
        if not isinstance(d["negated"], bool):
            problems.append(f"{w}: negated {d['negated']!r} is not a boolean")
        if d["subject"] not in SUBJECTS:
            problems.append(f"{w}: subject {d['subject']!r} not in {sorted(SUBJECTS)}")
        if d["subject"] == "family" and isinstance(code, str) and FAMILY_HISTORY_CODE.match(code):
            problems.append(f"{w}: family entry coded {code}; use the condition's own code")
        key = (d["name"].strip().lower(), d["negated"], d["subject"])
        if key in seen_dx:
            problems.append(f"{w}: duplicate of an earlier diagnosis on (name, negated, subject) {key}")
        seen_dx.add(key)

    check_evidence(gold, meds, dxs, text, where, problems)


def check_evidence(gold, meds, dxs, text, where, problems):
    evidence = gold["evidence"]
    if not isinstance(evidence, dict):
        problems.append(f"{where}: evidence is not an object")
        return
    expected = set()
    if gold["smoking_status"] != "unknown":
        expected.add("smoking_status")
    expected |= {k for k in SCALAR_EVIDENCE if gold[k] is not None}
    expected |= {f"current_medications[{i}]" for i in range(len(meds))}
    expected |= {f"diagnoses[{i}]" for i in range(len(dxs))}
    for key in sorted(expected - evidence.keys()):
        problems.append(f"{where}: evidence key {key!r} missing")
    for key in sorted(evidence.keys() - expected):
        m = re.fullmatch(r"(current_medications|diagnoses)\[(\d+)\]", key)
        if m:
            problems.append(f"{where}: evidence key {key!r} points past its list")
        elif key == "smoking_status" or key in SCALAR_EVIDENCE:
            problems.append(f"{where}: evidence key {key!r} given for an unknown or null field")
        else:
            problems.append(f"{where}: unknown evidence key {key!r}")
    for key, ev in evidence.items():
        w = f"{where} evidence[{key!r}]"
        if not isinstance(ev, str) or not ev.strip():
            problems.append(f"{w}: must be a non-empty string")
            continue
        if "\n" in ev or "\r" in ev:
            problems.append(f"{w}: crosses a line break")
        if ev not in text:
            problems.append(f"{w}: not an exact substring of the note: {ev!r}")
    # Content checks: the evidence must carry what it supports.
    for i, m in enumerate(meds):
        ev = evidence.get(f"current_medications[{i}]")
        if not isinstance(ev, str) or not isinstance(m, dict) or not isinstance(m.get("name"), str):
            continue
        if m["name"] not in ev.lower():
            problems.append(f"{where} current_medications[{i}]: name {m['name']!r} not in its evidence")
        if isinstance(m.get("dose"), str) and m["dose"] not in ev:
            problems.append(f"{where} current_medications[{i}]: dose {m['dose']!r} not in its evidence")
    for key in ("lvef_percent", "hba1c_percent"):
        v, ev = gold[key], evidence.get(key)
        if is_number(v) and isinstance(ev, str):
            forms = {f"{v:g}", f"{v:g}".replace(".", ",")}
            if not any(re.search(rf"(?<![\d.,]){re.escape(f)}(?![\d])", ev) for f in forms):
                problems.append(f"{where}: {key} {v} not in its evidence {ev!r}")


def note_lines(paths):
    out = set()
    for p in paths:
        for line in p.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if len(line) >= HELD_OUT_MIN_LINE:
                out.add(line)
    return out


def check_held_out(problems):
    dev_notes = sorted((EVAL / "dev" / "notes").glob("*.txt"))
    test_notes = sorted((EVAL / "test" / "notes").glob("*.txt"))
    for name in sorted({p.name for p in dev_notes} & {p.name for p in test_notes}):
        problems.append(f"{name}: in both dev and test")
    seen = note_lines(dev_notes)
    for note in test_notes:
        for line in sorted(note_lines([note]) & seen):
            problems.append(f"test/notes/{note.name}: line also in a dev note: {line[:60]!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
