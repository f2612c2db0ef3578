"""The decoder's building blocks: parameters declared with their logical axes (`param`),
the projection every weight matmul goes through, LoRA adapters included (`project`),
RMSNorm, the gated MLP, and the block-causal attention core the CPU uses
(`causal_attention`; the layer itself is `jaxcai.attention.Attention`).

Array names carry their shapes in the letters of the axis glossary in `jaxcai.model`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcai.model_config import ModelConfig
from jaxcai.sharding import constrain

__all__ = ["MLP", "RMSNorm", "causal_attention", "param", "project"]

Array = jax.Array

_init = nn.initializers.normal(stddev=0.02)


def param(
    module: nn.Module,
    name: str,
    shape: tuple[int, ...],
    names: tuple[str | None, ...],
    init: Any = _init,
    dtype: Any = None,
) -> Array:
    """A parameter of `module` declared with its logical axis `names` (which
    `jaxcai.sharding` maps to mesh axes), in the config's param dtype unless `dtype` is given."""
    config: ModelConfig = module.config
    dtype = config.jnp_param_dtype if dtype is None else dtype
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def project(
    module: nn.Module,
    name: str,
    x: Array,
    dims: str,
    shape: tuple[int, ...],
    names: tuple[str, ...],
) -> Array:
    """`x @ {name}_kernel` in the compute dtype; `dims` = "in,out" letters of the kernel
    (e.g. "d,nh": x is [B, T, D], the kernel [D, N, H]). When `name` is a LoRA target, adds
    (alpha / r) * (x @ A) @ B with float32 adapters `{name}_lora_a` [in..., r] (random) and
    `{name}_lora_b` [r, out...] (zeros, so a fresh adapter leaves the model unchanged)."""
    c: ModelConfig = module.config
    dt = c.jnp_dtype
    ins, outs = dims.split(",")
    kernel = param(module, f"{name}_kernel", shape, names)
    y = jnp.einsum(f"bt{ins},{ins}{outs}->bt{outs}", x, kernel.astype(dt))
    if not c.lora_rank or name not in c.lora_targets:
        return y
    r, n_in = c.lora_rank, len(ins)
    fan_in = math.prod(shape[:n_in])
    a_init = nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    # Adapters are trained, so they keep float32 master weights even over a bf16 base.
    a_names, b_names = (*names[:n_in], None), (None, *names[n_in:])
    a = param(module, f"{name}_lora_a", (*shape[:n_in], r), a_names, a_init, jnp.float32)
    b = param(
        module, f"{name}_lora_b", (r, *shape[n_in:]), b_names, nn.initializers.zeros, jnp.float32
    )
    xa = jnp.einsum(f"bt{ins},{ins}r->btr", x, a.astype(dt))
    delta = jnp.einsum(f"btr,r{outs}->bt{outs}", xa, b.astype(dt))
    return y + (c.lora_alpha / r) * delta


class RMSNorm(nn.Module):
    """RMS norm over the last axis (logically `axis`): `w * norm(x)` in the compute dtype,
    or with `norm_style="gemma"` `(1 + w) * norm(x)` in float32 (w starts at zero)."""

    config: ModelConfig
    axis: str = "embed"

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        c = self.config
        gemma = c.norm_style == "gemma"
        init = nn.initializers.zeros if gemma else nn.initializers.ones
        scale_D = param(self, "scale", (x_BTD.shape[-1],), (self.axis,), init)
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + c.rms_norm_eps)
        if gemma:
            return (x * (1.0 + scale_D.astype(jnp.float32))).astype(c.jnp_dtype)
        return x.astype(c.jnp_dtype) * scale_D.astype(c.jnp_dtype)


_ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": partial(nn.gelu, approximate=True)}


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-GELU (GeGLU)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: Array) -> Array:
        c = self.config
        dt = c.jnp_dtype
        zeros = nn.initializers.zeros
        gate = project(self, "gate", x_BTD, "d,f", (c.d_model, c.d_ff), ("embed", "mlp"))
        up = project(self, "up", x_BTD, "d,f", (c.d_model, c.d_ff), ("embed", "mlp"))
        if c.mlp_bias:
            gate = gate + param(self, "gate_bias", (c.d_ff,), ("mlp",), zeros).astype(dt)
            up = up + param(self, "up_bias", (c.d_ff,), ("mlp",), zeros).astype(dt)
        h = constrain(_ACTIVATIONS[c.mlp_activation](gate) * up, ("batch", "length", "mlp"))
        y = project(self, "down", h, "f,d", (c.d_ff, c.d_model), ("mlp", "embed"))
        if c.mlp_bias:
            y = y + param(self, "down_bias", (c.d_model,), ("embed",), zeros).astype(dt)
        return constrain(y, ("batch", "length", "embed"))


def causal_attention(
    q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, mask_B1TT: Array, scale: float, blocks: int = 8
) -> Array:
    """Grouped-query attention under a causal `mask_B1TT` (no token sees a later one), in
    about `blocks` query blocks of at least 64 tokens, each against the keys up to its
    last query only: the blocks above the diagonal, masked anyway, are never computed.

    The same values as `jax.nn.dot_product_attention(..., implementation="xla")` (scores
    accumulated in float32, masked to the same large negative, softmax in float32) up to
    float32 rounding; on CPU it takes about 40% less time, forward and backward
    (benchmarks/README.md, "Train step"). The einsums keep the `[B, T, K, G, H]` layout, so
    no transposed copy of q, k or v is written."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    f32 = jnp.float32
    masked = jnp.asarray(-0.7 * jnp.finfo(f32).max, f32)
    size = max(64, -(-T // blocks))
    outs = []
    for start in range(0, T, size):
        end = min(start + size, T)
        s_BKGCS = jnp.einsum(
            "btkgh,bskh->bkgts", q_BTKGH[:, start:end], k_BTKH[:, :end],
            preferred_element_type=f32,
        )  # fmt: skip
        s_BKGCS = jnp.where(mask_B1TT[:, :, None, start:end, :end], s_BKGCS * scale, masked)
        p_BKGCS = jax.nn.softmax(s_BKGCS, axis=-1).astype(v_BTKH.dtype)
        outs.append(jnp.einsum("bkgts,bskh->btkgh", p_BKGCS, v_BTKH[:, :end]))
    return jnp.concatenate(outs, axis=1).reshape(B, T, N, H)
