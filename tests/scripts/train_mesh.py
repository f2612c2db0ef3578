"""Run `jaxcai.loop.run` for a list of jobs, one after another, in this process.

    python train_mesh.py JOBS

`JOBS` is a JSON list of `{"run_dir": str, "overrides": [str, ...]}`: each job composes
the config `jaxcai-train overrides...` would and trains it in `run_dir`. The test sets the
number of fake CPU devices (`XLA_FLAGS`) and, for multi-process runs, passes the
`distributed.*` overrides. Prints one JSON line per finished job (what this process saw);
`tests/test_train_sharded.py` reads the losses from each run's `metrics.jsonl`.
`jaxcai` INFO logs (e.g. "resumed from checkpoint 3") go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys

import jax

from jaxcai import config, loop


def main(jobs: list[dict]) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxcai").setLevel(logging.INFO)
    for job in jobs:
        cfg = config.compose(job["overrides"])
        result = loop.run(cfg, job["run_dir"])
        print(
            json.dumps(
                {
                    "run_dir": job["run_dir"],
                    "process_index": jax.process_index(),
                    "process_count": jax.process_count(),
                    "device_count": jax.device_count(),
                    "local_device_count": jax.local_device_count(),
                    "step": result["step"],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
