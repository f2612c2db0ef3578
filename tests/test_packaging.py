"""The package as installed from a wheel (`pip install .`), not from the checkout.

The Hydra configs live in the repository's top-level `configs/` directory and ship in the
package as `jaxcai.configs` (pyproject.toml maps it), next to the tokenizer (`assets/`)
and the bundled data files (`data/files/`). The fast tests check that a wheel built from
the source holds all of it; the slow one installs that wheel into a fresh virtual
environment and runs `jaxcai-train` from a directory outside the checkout.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
COMMANDS = sorted(PYPROJECT["project"]["scripts"])
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc")


def _source_dirs() -> dict[str, str]:
    """Each top-level package directory of the source, by the package it becomes."""
    return {"jaxcai": "jaxcai", **SETUPTOOLS.get("package-dir", {})}


def _source_files() -> dict[str, Path]:
    """Every file of the source's package directories, by its path in an installed wheel."""
    files = {}
    for package, directory in _source_dirs().items():
        root = REPO / directory
        for path in root.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                rel = path.relative_to(root).as_posix()
                files[f"{package.replace('.', '/')}/{rel}"] = path
    return files


def _clean_copy(dest: Path) -> Path:
    """The build's inputs, copied: a build in the checkout itself would write `build/`
    and `*.egg-info` there, and setuptools puts stale files from an old `build/` into
    the next wheel."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for directory in _source_dirs().values():
        shutil.copytree(REPO / directory, dest / directory, ignore=IGNORED)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built from a clean copy of the checkout, without build isolation
    (no downloads: the installed setuptools builds)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = _clean_copy(tmp / "src")
    out = tmp / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("jaxcai-*.whl")
    (sdist,) = out.glob("jaxcai-*.tar.gz")
    return wheel, sdist


def test_every_package_is_listed():
    """`packages` is a list (the configs mapping rules out discovery): every directory
    under jaxcai/ with an `__init__.py` must be in it."""
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "jaxcai").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    listed = set(SETUPTOOLS["packages"])
    missing = sorted(found - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
    assert SETUPTOOLS["package-dir"] == {"jaxcai.configs": "configs"}
    assert listed - found == {"jaxcai.configs"}
    assert (REPO / "configs" / "__init__.py").is_file()  # Hydra's pkg:// needs it


def test_wheel_and_sdist_hold_configs_assets_and_data(built):
    wheel, sdist = built
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    expected = _source_files()
    missing = sorted(set(expected) - names)
    assert not missing, f"not in the wheel: {missing}"
    for name in (
        "jaxcai/configs/__init__.py",
        "jaxcai/configs/train.yaml",
        "jaxcai/configs/cai.yaml",
        "jaxcai/configs/experiment/smoke_sft.yaml",
        "jaxcai/configs/experiment/cai_smoke.yaml",
        "jaxcai/configs/constitution/default.yaml",
        "jaxcai/configs/constitution/minimal.yaml",
        "jaxcai/assets/tokenizer.model",
        "jaxcai/data/files/sft.jsonl",
        "jaxcai/data/files/red_team_prompts.jsonl",
    ):
        assert name in names
    stray = sorted(n for n in names if not n.startswith(("jaxcai/", "jaxcai-")))
    assert not stray, f"outside the package: {stray}"  # no top-level configs/ package
    for command in COMMANDS:
        assert f"{command} = jaxcai.main." in entry_points
    with tarfile.open(sdist) as t:
        members = {m.name.split("/", 1)[1] for m in t.getmembers() if "/" in m.name}
    in_sdist = {p.relative_to(REPO).as_posix() for p in expected.values()}
    assert not sorted(in_sdist - members), f"not in the sdist: {sorted(in_sdist - members)}"


def _venv_env() -> dict[str, str]:
    """The environment for the venv's commands: nothing that puts the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(built, tmp_path):
    """The wheel in a fresh venv, not the checkout or its editable install: `jaxcai-train
    experiment=smoke_sft` from an empty directory elsewhere writes a run.

    The venv has no system site-packages while the wheel is installed, so pip there sees
    no other jaxcai. Only afterwards does a `.pth` file add this interpreter's
    site-packages directories (for jax and the rest) as plain path entries: `.pth` files
    inside them are not processed then, so the editable install's finder (a `.pth` hook
    that maps `jaxcai` to the checkout) never loads, and the venv's own site-packages
    comes first on the path. The test checks that `jaxcai` and `jaxcai.configs` import
    from the venv."""
    wheel, _ = built
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, symlinks=os.name != "nt")
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    env = _venv_env()
    work = tmp_path / "work"  # outside the checkout: pytest's tmp_path is under /tmp
    work.mkdir()
    assert REPO not in work.resolve().parents

    def run(*cmd, timeout=300):
        proc = subprocess.run(
            [str(c) for c in cmd],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    purelib = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    outer = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        outer.append(site.getusersitepackages())
    (purelib / "_outer_site_packages.pth").write_text("".join(f"{p}\n" for p in outer))

    where = run(
        python,
        "-c",
        "import sys, importlib.resources as r, jaxcai, jaxcai.configs, jax\n"
        "print(jaxcai.__file__)\n"
        "print(r.files('jaxcai.configs'))\n"
        "print(any('editable' in repr(f).lower() for f in sys.meta_path))\n"
        "from jaxcai.cai.constitution import load_constitution\n"
        "print(len(load_constitution('default').critiques))\n",
    ).splitlines()
    assert Path(where[0]).is_relative_to(purelib), where
    assert Path(where[1]) == purelib / "jaxcai" / "configs", where
    assert where[2] == "False", "the editable install's finder is active in the venv"
    assert int(where[3]) > 0

    for command in COMMANDS:  # every command composes its config from the package
        run(bindir / command, "--cfg", "job", timeout=120)
    run(bindir / "jaxcai-cai", "experiment=cai_smoke", "--cfg", "job", timeout=120)

    run(
        bindir / "jaxcai-train", "experiment=smoke_sft", "trainer.steps=2", "trainer.progress=false"
    )
    (run_dir,) = (work / "outputs" / "train").iterdir()
    assert (run_dir / "metrics.jsonl").read_text().strip()
    assert (run_dir / "checkpoints" / "2").is_dir()
