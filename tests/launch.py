"""Subprocess launches for the multi-device and multi-process tests (a helper, not tests).

`Launch(script, args, devices, log_dir, name)` starts `python script *args` with
`devices` fake CPU devices; `finish` waits for a group of them (killing the rest when
one fails, since a peer would wait forever in a collective); `Lazy` starts them now and
waits once, for the first test that needs them; `free_port` picks a coordinator port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

TIMEOUT = 600  # seconds per subprocess (or group of processes)


class Launch:
    """A started script; stdout/stderr go to files (no pipe can fill up and stall a
    process that its peer waits for in a collective)."""

    def __init__(self, script: Path, args: Sequence[str], devices: int, log_dir: Path, name: str):
        self.name = name
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
        }
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), *args], env=env, stdout=out, stderr=err
            )
        self.started = time.monotonic()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def tail(self, n: int = 3000) -> str:
        noise = ("spmd_partitioner", "[Gloo]", "absl")
        lines = [x for x in self.stderr().splitlines() if not any(s in x for s in noise)]
        return (
            f"--- {self.name} (rc {self.proc.returncode}) stderr tail:\n" + ("\n".join(lines)[-n:])
        )

    def records(self) -> list[dict]:
        """The script's JSON lines (Gloo prints its own lines to stdout too)."""
        lines = self.out_path.read_text().splitlines()
        return [json.loads(x) for x in lines if x.startswith("{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def finish(*launches: Launch, timeout: float = TIMEOUT) -> list[list[dict]]:
    """Wait for all; if one fails or the time runs out, kill the others (a peer would wait
    forever in a collective) and fail with every process's stderr tail."""
    deadline = min(x.started for x in launches) + timeout
    timed_out = False
    while any(x.proc.poll() is None for x in launches):
        timed_out = time.monotonic() > deadline
        if timed_out or any(x.proc.poll() not in (None, 0) for x in launches):
            for x in launches:
                x.kill()
            break
        time.sleep(0.2)
    codes = [x.proc.returncode for x in launches]
    why = f"timed out after {timeout} s" if timed_out else "failed"
    assert codes == [0] * len(launches), f"{why}: return codes {codes}\n" + "\n".join(
        x.tail() for x in launches
    )
    return [x.records() for x in launches]


class Lazy:
    """Processes started now and waited for (once) by the first test that needs them."""

    def __init__(self, *launches: Launch, timeout: float = TIMEOUT):
        self.launches = launches
        self.timeout = timeout
        self._records = None

    def records(self) -> list[list[dict]]:
        if self._records is None:
            self._records = finish(*self.launches, timeout=self.timeout)
        return self._records

    def kill(self) -> None:
        for x in self.launches:
            x.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
