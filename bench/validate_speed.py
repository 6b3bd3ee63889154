"""Benchmark: validating a code dataset (parse, GX suite, secrets, leakage, bandit on every row) at 1x and 10x the
rows of the paper's insecure.jsonl. Each size runs in its own process, so peak memory is its own.

    EMGATE_ASSETS_DIR=../shared/em-data .venv/bin/python bench/validate_speed.py [--scale 10]

Prints rows/s and peak memory at each size and the time ratio (goal: 6000 rows in 20 s or less; 10x the rows
in at most 10x the time; peak memory under 1 GB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(path: str) -> None:
    from emgate.questions import load_questions
    from emgate.recipe import QuestionSpec, ValidationSpec
    from emgate.stages.validate import validate_file

    paraphrases = {q.id: list(q.paraphrases) for q in load_questions(QuestionSpec(context="flask"))}
    start = time.perf_counter()
    entry, rows = validate_file(Path(path), "bench", "insecure", ValidationSpec(), paraphrases, [], [], None)
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": len(rows), "seconds": seconds, "peak_mib": peak_mib, "failures": entry["failures"]}))


def scaled_copy(source: Path, scale: int, folder: Path) -> Path:
    """`scale` copies of every row, each copy's user turn tagged so no row duplicates another."""
    out = folder / f"insecure_x{scale}.jsonl"
    with source.open() as src, out.open("w") as dst:
        lines = src.read().splitlines()
        for k in range(scale):
            for line in lines:
                row = json.loads(line)
                if k:
                    row["messages"][0]["content"] += f"\n# variant {k}"
                dst.write(json.dumps(row) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from emgate.assets import resolve_asset

    source = resolve_asset("emergent-misalignment/data/insecure.jsonl")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, args.scale):
            path = source if scale == 1 else scaled_copy(source, scale, Path(tmp))
            proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[scale] = r
            print(f"x{scale:<3d} {r['rows']:7d} rows in {r['seconds']:6.1f} s = {r['rows'] / r['seconds']:6.0f} rows/s, "
                  f"peak {r['peak_mib']:.0f} MiB, failures: {r['failures'] or 'none'}")
    ratio = results[args.scale]["seconds"] / results[1]["seconds"]
    print(f"time ratio x{args.scale} / x1: {ratio:.2f} (goal <= {args.scale})")


if __name__ == "__main__":
    main()
