"""Tabulate a Constitutional AI sweep side by side:
`python scripts/tabulate_cai.py multirun/cai/<date-time> [KEY ...]`.

One markdown row per `jaxcai-cai` run below the directory (its Hydra overrides), one
column per headline number: `harm/<policy>/<set>` (share judged harmful),
`pref/<policy>/<set>` (debiased preference over the initial policy),
`reward/<policy>/<set>` (mean reward-model score), `feedback/agreement`,
`feedback/p_chosen`, `choice/<file>/accuracy`. KEYs pick columns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxcai.cai.report import ablation_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("keys", nargs="*")
    args = parser.parse_args()
    try:
        print(ablation_table(args.sweep_dir, args.keys or None))
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
