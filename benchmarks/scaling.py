"""Train-step scaling over fake CPU devices: `python -m benchmarks.scaling [overrides]`.

JAX fixes its CPU device count when its backend starts, from
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, so one process cannot try several
counts. For each N in `devices` (default 1, 2, 4, 8) this program runs
`python -m benchmarks.train_step` in a subprocess with that flag (other XLA_FLAGS kept,
`JAX_PLATFORMS=cpu`), the workload passed through (the `model` and `objective` choices
and any `model.*` / `objective.*` overrides, `batch_size`, `seq_len`, `prompt_len`,
`steps`, `warmup`, `matmul_size`, then `extra`) and the mesh laid out by `layout`
(`data`: `mesh.data=-1`; `fsdp`: `mesh.data=1 mesh.fsdp=-1`). Each run writes to
`<this run's directory>/n<N>`; its last stdout line (JSON) is its result.

**Fake devices share the cores.** The N devices are N views of the same CPU: the sweep
holds the hardware fixed and measures what sharding costs (partitioned programs,
collectives, per-device dispatch). The ideal tokens/s ratio to 1 device ("vs 1 device")
is therefore 1.0, not N. The usual scaling efficiency, tokens/s(N) / (N * tokens/s(1)),
is reported too ("efficiency"): it is what to read on real devices, where each one adds
hardware; on fake ones its ideal is 1/N. Likewise train_step's MFU divides by N times the
matmul peak of one device, though the devices share one CPU: "MFU (shared)" is measured
against the peak of that one CPU instead (MFU x N).

Prints a markdown table and one JSON line last (`rows`); `result.json` in the run
directory holds the list of rows. `python -m benchmarks.scaling -m layout=data,fsdp`
(Hydra multirun) makes one full sweep per layout.

`relaunch_with_devices` serves the direct form,
`python -m benchmarks.train_step -m +devices=1,2,4,8` (Hydra multirun of train_step): a
train_step job given `devices` reruns itself in a subprocess with that many devices.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
COUNT_FLAG = "--xla_force_host_platform_device_count"
CHILD_MARK = "JAXCAI_BENCH_DEVICES"  # set in a relaunched train_step: stops a second relaunch
LAYOUTS = {"data": ("mesh.data=-1",), "fsdp": ("mesh.data=1", "mesh.fsdp=-1")}
GROUPS = ("model", "objective")  # config groups: their choice and any `group.key=` overrides
PASSED = ("batch_size", "seq_len", "prompt_len", "steps", "warmup", "matmul_size")


class SubRunError(RuntimeError):
    """A train_step subprocess failed or reported something unexpected."""


def device_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) set up for `devices` fake CPU devices:
    the device-count flag replaced in XLA_FLAGS (the other flags kept), JAX on the CPU."""
    env = dict(os.environ if base is None else base)
    kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*kept, f"{COUNT_FLAG}={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)  # would override the XLA flag
    env[CHILD_MARK] = str(devices)
    return env


def last_json_line(stdout: str) -> dict | None:
    """The last line of `stdout` that is a JSON object, or None."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _tail(text: str, chars: int = 3000) -> str:
    return text[-chars:] if len(text) > chars else text


def run_train_step(
    overrides: list[str], devices: int, run_dir: Path, timeout_s: float | None = None
) -> tuple[dict, subprocess.CompletedProcess]:
    """Run `python -m benchmarks.train_step` on `devices` fake CPU devices into `run_dir`;
    its result (checked to have seen `devices` devices) and the finished process."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    env = device_env(devices)
    shown = f"XLA_FLAGS={shlex.quote(env['XLA_FLAGS'])} JAX_PLATFORMS=cpu {shlex.join(command)}"
    log.info("running %s", shown)
    try:
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:
        raise SubRunError(f"train_step timed out after {timeout_s} s: {shown}") from exc
    if proc.returncode != 0:
        raise SubRunError(
            f"train_step on {devices} devices failed (exit {proc.returncode}): {shown}\n"
            f"--- stderr (tail) ---\n{_tail(proc.stderr)}"
        )
    result = last_json_line(proc.stdout)
    if result is None:
        raise SubRunError(
            f"train_step on {devices} devices printed no JSON line: {shown}\n"
            f"--- stdout (tail) ---\n{_tail(proc.stdout)}"
        )
    if result.get("devices") != devices:
        raise SubRunError(
            f"train_step asked for {devices} devices but saw {result.get('devices')}: {shown}"
        )
    return result, proc


def relaunch_with_devices(cfg: DictConfig) -> dict | None:
    """For train_step's optional `devices` key: rerun the same job in a fresh subprocess on
    that many fake CPU devices, into the same run directory (every count alike, so peak
    RSS and compile times are each its own); echo its output and return its result.
    None, to run here: no `devices` key, or this is that subprocess (checked to see them)."""
    wanted = cfg.get("devices")
    if wanted is None:
        return None
    wanted = int(wanted)
    if os.environ.get(CHILD_MARK) == str(wanted):
        import jax  # train_step has imported it already

        if jax.default_backend() != "cpu" or jax.device_count() != wanted:
            raise SubRunError(
                f"relaunched for {wanted} CPU devices but JAX has {jax.device_count()} "
                f"{jax.default_backend()} devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
            )
        return None
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    result, proc = run_train_step(list(hydra_cfg.overrides.task), wanted, run_dir)
    sys.stderr.write(proc.stderr)
    sys.stdout.write(proc.stdout)
    sys.stdout.flush()
    return result


def group_overrides(task_overrides: list[str]) -> list[str]:
    """The command line's overrides of keys inside the model and objective groups
    (`objective.reference=model`, `+model.x=1`, ...), to be repeated to train_step."""
    prefixes = tuple(f"{group}." for group in GROUPS)
    return [o for o in task_overrides if o.split("=", 1)[0].lstrip("+~").startswith(prefixes)]


def sweep_overrides(cfg: DictConfig, choices: dict, task_overrides: list[str]) -> list[str]:
    """The train_step overrides shared by every device count of the sweep."""
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"layout={cfg.layout!r}: choose one of {sorted(LAYOUTS)}")
    groups = [f"{group}={choices[group]}" for group in GROUPS]
    passed = [f"{key}={cfg[key]}" for key in PASSED]
    layout = LAYOUTS[cfg.layout]
    return [*groups, *group_overrides(task_overrides), *passed, *layout, *cfg.extra]


def check_devices(devices: list[int], batch_size: int) -> None:
    """Each count positive and dividing the batch (the batch is split over all devices)."""
    if not devices:
        raise ValueError("devices=[]: give at least one device count")
    for n in devices:
        if n < 1 or batch_size % n:
            raise ValueError(f"devices: {n} must be positive and divide batch_size={batch_size}")


def make_row(result: dict, base: dict, layout: str, run_dir: Path) -> dict:
    """One table row from a train_step result, compared with the baseline's."""
    n, n0 = result["devices"], base["devices"]
    ratio = result["tokens_per_s"] / base["tokens_per_s"]
    return {
        "devices": n,
        "layout": layout,
        "objective": result["objective"],
        "model": result["model"],
        "batch_size": result["batch_size"],
        "seq_len": result["seq_len"],
        "tokens_per_s": result["tokens_per_s"],
        "step_s": result["step_s"],
        "compile_s": result["compile_s"],
        "mfu": result["mfu"],
        "mfu_shared": round(result["mfu"] * n, 4),
        "peak_rss_mb": result["peak_rss_mb"],
        "baseline_devices": n0,
        "vs_1_device": round(ratio, 4),
        "efficiency": round(ratio * n0 / n, 4),
        "run_dir": str(run_dir),
    }


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    head = (
        "| devices | layout | tokens/s | step s | MFU | MFU (shared) | peak RSS MB "
        "| vs 1 device | efficiency |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        cells = (
            r["devices"],
            r["layout"],
            f"{r['tokens_per_s']:.1f}",
            f"{r['step_s']:.4f}",
            f"{r['mfu']:.2%}",
            f"{r['mfu_shared']:.2%}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['vs_1_device']:.3f}",
            f"{r['efficiency']:.3f}",
        )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


@hydra.main(config_path="pkg://jaxcai.configs", config_name="bench_scaling", version_base=None)
def main(cfg: DictConfig) -> list[dict]:
    devices = sorted({int(n) for n in cfg.devices})
    check_devices(devices, int(cfg.batch_size))
    hydra_cfg = HydraConfig.get()
    overrides = sweep_overrides(cfg, hydra_cfg.runtime.choices, list(hydra_cfg.overrides.task))
    out_dir = Path(hydra_cfg.runtime.output_dir)
    results = []
    for n in devices:
        result, _ = run_train_step(overrides, n, out_dir / f"n{n}", cfg.timeout_s)
        log.info("%d devices: %.1f tokens/s", n, result["tokens_per_s"])
        results.append(result)
    rows = [make_row(r, results[0], cfg.layout, out_dir / f"n{r['devices']}") for r in results]
    (out_dir / "result.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown_table(rows))
    config = OmegaConf.to_container(cfg, resolve=True)
    print(json.dumps({"benchmark": "scaling", "config": config, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
