"""Run `jaxcai.cai.run.run_cai` in this process (the test sets XLA_FLAGS).

    python cai_multihost.py JOB

`JOB` is `{"run_dir": str, "overrides": [str, ...]}`: the config `jaxcai-cai
overrides...` composes, run in `run_dir`. For a multi-process launch the overrides hold
`distributed.*`, so `run_cai` initialises `jax.distributed` itself. Prints one JSON line
(what this process saw) for `tests/test_multihost_sampling.py`.
"""

from __future__ import annotations

import json
import logging
import sys

import jax

from jaxcai.cai.run import run_cai
from jaxcai.config import compose


def main(job: dict) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxcai").setLevel(logging.INFO)
    records = run_cai(compose(job["overrides"], "cai"), job["run_dir"])
    seen = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "stages": list(records),
    }
    print(json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
