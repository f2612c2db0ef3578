"""Logical axis rules, meshes, and the model sharded over 8 fake CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import make_hf_model
from jax.sharding import PartitionSpec as P

from jaxcai.sharding import DEFAULT_RULES, MeshConfig, constrain, logical_to_spec, make_mesh

SCRIPT = Path(__file__).parent / "scripts" / "sharded_forward.py"


def test_rules_resolve_weights_and_activations():
    assert logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
    assert logical_to_spec(("layers", "mlp", "embed")) == P(None, "tensor", "fsdp")
    # `batch` takes fsdp first, so `embed` in an activation falls through to no sharding.
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("batch", "length", "vocab")) == P(("data", "fsdp"), None, "tensor")


def test_rules_skip_axes_that_do_not_divide():
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    # On a 1-device mesh every axis divides.
    assert logical_to_spec(("vocab", "embed"), DEFAULT_RULES, (97, 64), mesh) == P("tensor", "fsdp")


def test_unknown_logical_name_is_an_error():
    with pytest.raises(KeyError, match="logical axis 'embd'.*has no sharding rule"):
        logical_to_spec(("batch", "embd"))
    # Even outside a mesh, so a typo cannot wait for the first multi-device run.
    with pytest.raises(KeyError, match="'lenght'"):
        constrain(jnp.zeros((2, 3)), ("batch", "lenght"))
    rules = (("batch", "data"),)
    with pytest.raises(KeyError, match="'vocab'"):
        logical_to_spec(("batch", "vocab"), rules)


def test_mesh_config_shapes():
    assert MeshConfig().shape(8) == (8, 1, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).shape(8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        MeshConfig(data=-1, tensor=3).shape(8)
    with pytest.raises(ValueError, match="4 devices, but 8 devices are available"):
        MeshConfig(data=2, fsdp=2, tensor=1).shape(8)
    with pytest.raises(ValueError, match="positive or -1"):
        MeshConfig(data=0).shape(8)


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf")
    make_hf_model("llama_gqa_rope3").save_pretrained(hf_dir)  # vocab 97: not divisible by 2
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(hf_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r["mesh"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2t2"])
def test_sharded_logits_equal_single_device(sharded_results, mesh):
    r = sharded_results[mesh]
    assert r["max_diff"] <= 1e-5
    assert r["hf_max_diff"] <= 1e-5  # Hugging Face weights loaded straight into shards
    assert r["fresh_equal"]  # init_sharded gives the same values as init_params


@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "d2f2t2"])
def test_params_are_sharded_as_the_rules_say(sharded_results, mesh):
    r = sharded_results[mesh]
    sizes = r["mesh_shape"]
    for name, p in r["params"].items():
        assert p["spec"] == p["expected"], name
        assert r["fresh_specs"][name] == p["expected"], name
        # The shard really is smaller where the spec names mesh axes of size > 1.
        axes_per_dim = p["axes"] + [[]] * (len(p["global"]) - len(p["axes"]))
        for dim, axes, shard in zip(p["global"], axes_per_dim, p["shard"], strict=True):
            split = 1
            for a in axes:
                split *= sizes[a]
            assert shard == dim // split, (name, p)
    if mesh == "fsdp8":
        assert r["params"]["['layers']['attn']['q_kernel']"]["shard"] == [2, 8, 4, 16]
    if mesh == "d2f2t2":
        assert r["params"]["['embed']"]["shard"] == [512, 32]
        # Vocabulary 97 cannot be split over tensor=2: that dimension stays whole.
        assert r["loaded_specs"]["['embed']"] == "P(None, 'fsdp')"
        assert r["loaded_specs"]["['lm_head']"] == "P('fsdp', None)"


def test_activations_are_constrained(sharded_results):
    assert sharded_results["d2f2t2"]["logits_spec"] == "P(('data', 'fsdp'), None, 'tensor')"
    assert sharded_results["fsdp8"]["logits_spec"] == "P('fsdp',)"
