#!/usr/bin/python3
"""Parses Prometheus text (stdin or a file) with prometheus_client's own parser and checks the
conventions: one HELP and TYPE per family, counters end in _total, unit/instance labels on the
per-unit families. Prints the families as JSON {name: {type, samples: [[name, labels, value]]}}."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

text = open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()
for kind in ("HELP", "TYPE"):
    names = [l.split()[2] for l in text.splitlines() if l.startswith(f"# {kind} ")]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        sys.exit(f"more than one # {kind} for {sorted(dup)}")
out = {}
for fam in text_string_to_metric_families(text):
    if not fam.documentation:
        sys.exit(f"{fam.name}: no HELP")
    for s in fam.samples:
        if fam.type == "counter" and not s.name.endswith("_total"):
            sys.exit(f"counter sample {s.name} does not end in _total")
        if fam.name.startswith("watchkeeper_unit_") and not {"unit", "instance"} <= set(s.labels):
            sys.exit(f"{s.name} lacks unit/instance labels: {s.labels}")
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
if not out:
    sys.exit("no metric families")
print(json.dumps(out))
