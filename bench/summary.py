"""bench/results/SUMMARY.md: one table of every benchmark's headline ratios (the `summary` list of each
results/<name>.json), with the machine and when each was measured."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import RESULTS, md_table

ORDER = ["teacher_throughput", "cache_size", "shard_write", "input_pipeline", "train_cost", "ttft"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="a line to add under the table (e.g. the run's wall time)")
    args = parser.parse_args()
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))}
    names = [n for n in ORDER if n in reports] + sorted(set(reports) - set(ORDER))
    rows, without, machines = [], [], set()
    for name in names:
        report = reports[name]
        if "summary" not in report:
            without.append(name)
            continue
        m = report.get("machine", {})
        cores = m.get("cpus") or m.get("threads", "?")  # train_cost.json records torch's threads only
        machines.add(f"{m.get('cpu_capability', '?')} CPU, {cores} cores, torch {m.get('torch', '?')}")
        for h in report["summary"]:
            ratio = "-" if h["ratio"] is None else h["ratio"]
            rows.append([f"{h['benchmark']} ([{name}]({name}.md))", h["measured"], h["reference"], ratio])
    lines = [
        "# Benchmarks",
        "",
        f"Built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from bench/results/*.json; "
        "each ratio is measured / reference, both measured in the same run on the same machine.",
        "",
    ]
    lines += md_table(["benchmark", "measured", "reference", "ratio"], rows)
    lines += ["", f"Machine: {'; '.join(sorted(machines))}."]
    if args.note:
        lines += ["", args.note]
    if without:
        lines += ["", f"Results without a summary (older format, not run by `make bench`): {', '.join(without)}."]
    (args.results / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
