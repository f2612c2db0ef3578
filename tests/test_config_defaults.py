"""Defaults are stated once: the typed dataclasses of `jaxcai.config` hold them, and a
YAML group may not write one of them a second time (where it must, because benchmark
configs compose it without the typed schema, it must agree with the dataclass)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jaxcai.config import (
    CONFIG_DIR,
    DataConfig,
    MeshConfigSchema,
    ObjectiveConfig,
    OptimizerConfig,
    TrainerConfig,
)

GROUPS = Path(CONFIG_DIR)


def _defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize(
    "group, cls", [("trainer", TrainerConfig), ("optimizer", OptimizerConfig), ("data", DataConfig)]
)
def test_typed_groups_write_only_what_differs(group, cls):
    defaults = _defaults(cls)
    for path in sorted((GROUPS / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        for key, value in values.items():
            assert key in defaults, f"{path.name}: {key} is not a field of {cls.__name__}"
            assert value != defaults[key], (
                f"{group}/{path.name} restates the default {key}={value!r}; "
                f"it lives in jaxcai.config.{cls.__name__}"
            )


@pytest.mark.parametrize("group, cls", [("objective", ObjectiveConfig), ("mesh", MeshConfigSchema)])
def test_untyped_groups_agree_with_the_dataclass(group, cls):
    """Benchmark configs compose these groups without the schema, so they list values;
    each must be the dataclass default (an objective file sets only its `name`)."""
    defaults = _defaults(cls)
    for path in sorted((GROUPS / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        for key, value in values.items():
            if key == "name":
                continue
            assert key in defaults, f"{path.name}: {key} is not a field of {cls.__name__}"
            assert value == defaults[key], (
                f"{group}/{path.name}: {key}={value!r} but jaxcai.config.{cls.__name__} "
                f"says {defaults[key]!r}"
            )
