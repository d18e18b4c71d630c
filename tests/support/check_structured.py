"""Independent check of a `structured` pipeline's table, for the end-to-end tests.

pyarrow reads the table; every row, rebuilt from the schema's columns, is validated against
the row schema with jsonschema; evidence offsets must index the quoted text in the document.

usage: check_structured.py TABLE_DIR SCHEMA_JSON ITEMS|- EVIDENCE|- DOCS_JSON
DOCS_JSON maps document ids to their text. Prints one JSON object.
"""
import json
import sys

import jsonschema
import pyarrow.dataset as ds

table_dir, schema_path, items, evidence, docs_path = sys.argv[1:6]
with open(schema_path, encoding="utf-8") as f:
    schema = json.load(f)
with open(docs_path, encoding="utf-8") as f:
    docs = json.load(f)
row_schema = schema if items == "-" else schema["properties"][items]["items"]


def clean(value, s):
    """Drops the nulls Parquet holds for absent optional properties."""
    if isinstance(value, dict) and "properties" in s:
        req = set(s.get("required", []))
        return {
            k: clean(v, s["properties"].get(k, {}))
            for k, v in value.items()
            if k in s["properties"] and (v is not None or k in req)
        }
    if isinstance(value, list) and "items" in s:
        return [clean(v, s["items"]) for v in value]
    return value


table = ds.dataset(table_dir, format="parquet", partitioning="hive").to_table()
invalid, evidence_bad, spans, alignments = [], [], [], []
for r in table.to_pylist():
    row = clean({k: r[k] for k in row_schema["properties"]}, row_schema)
    try:
        jsonschema.validate(row, row_schema)
    except jsonschema.ValidationError as e:
        invalid.append({"document_id": r["document_id"], "error": e.message})
    if evidence != "-":
        alignments.append(r["alignment"])
        if r["evidence_start"] is not None:
            text = docs[r["document_id"]]
            spans.append([r["document_id"], r["evidence_start"], r["evidence_end"]])
            if text[r["evidence_start"]:r["evidence_end"]] != r[evidence].strip():
                evidence_bad.append([r["document_id"], r["evidence_start"], r["evidence_end"]])
print(json.dumps({
    "rows": table.num_rows,
    "types": {f.name: str(f.type) for f in table.schema},
    "invalid": invalid,
    "evidence_bad": evidence_bad,
    "spans": spans,
    "alignments": alignments,
}))
