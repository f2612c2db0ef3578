"""Compare the runs of a sweep: `python scripts/compare_runs.py multirun/<date-time> [KEY ...]`.

Prints one row per run directory (any folder below the given one holding metrics.jsonl):
its Hydra overrides and the last logged value of each KEY (default: the final eval
metrics), sorted by the first KEY.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from jaxcai.metrics import read_metrics


def last_values(run_dir: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    for record in read_metrics(run_dir):
        values.update({k: v for k, v in record.items() if v is not None})
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("keys", nargs="*")
    args = parser.parse_args()
    runs = sorted(p.parent for p in args.sweep_dir.rglob("metrics.jsonl"))
    if not runs:
        raise SystemExit(f"no metrics.jsonl below {args.sweep_dir}")
    rows = []
    for run in runs:
        values = last_values(run)
        overrides_file = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        rows.append(
            (" ".join(o for o in overrides if not o.startswith("experiment=")) or run.name, values)
        )
    keys = args.keys or sorted({k for _, v in rows for k in v if k.startswith("eval/")})
    rows.sort(key=lambda r: r[1].get(keys[0], float("inf")))
    width = max(len(name) for name, _ in rows)
    print(f"{'run':<{width}}  " + "  ".join(f"{k:>22}" for k in keys))
    for name, values in rows:
        cells = "  ".join(f"{values.get(k, float('nan')):>22.5g}" for k in keys)
        print(f"{name:<{width}}  {cells}")


if __name__ == "__main__":
    main()
