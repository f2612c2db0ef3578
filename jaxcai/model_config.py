"""`ModelConfig`: every shape and numeric choice of a Llama-family decoder (Llama,
Mistral, Qwen2, Qwen3 and Gemma-3 text).

A config is a frozen dataclass, so it is hashable and can be a static argument of
`jax.jit`. Presets reproduce the published shapes of real checkpoints: `ModelConfig`
inherits their constructors from `jaxcai.model_presets`, and `preset` finds one by name;
the YAML files under `configs/model/` carry the same values for Hydra. `param_count` and
`flops_per_token` size a config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxcai.model_presets import ModelPresets
from jaxcai.model_presets import gemma3_layer_types as gemma3_layer_types  # re-exported

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA can adapt
ATTENTION_IMPLS = (None, "xla", "cudnn")
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
NORM_STYLES = ("llama", "gemma")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALINGS = ("llama3", "linear")
AUTO_CHUNK = -1  # `logits_chunk` sentinel: chunk large vocabularies (`auto_logits_chunk`)
LARGE_VOCAB = 32_768  # vocabularies above this get chunked logits by default
DEFAULT_CHUNK = 256  # positions per chunk they get


def auto_logits_chunk(vocab_size: int) -> int:
    """The `logits_chunk` that `AUTO_CHUNK` resolves to: `DEFAULT_CHUNK` positions for a
    vocabulary over `LARGE_VOCAB` (Llama-3's 128k, Qwen3's 152k, Gemma-3's 262k: their full
    float32 logits of a 2048-token DPO pair are 2-4 GB), else 0 (all at once)."""
    return DEFAULT_CHUNK if vocab_size > LARGE_VOCAB else 0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, as Hugging Face's `rope_type`: `llama3` (Llama-3.1/3.2:
    long wavelengths divided by `factor`, a smooth ramp between `low_freq_factor` and
    `high_freq_factor`) or `linear` (every frequency divided by `factor`, i.e. positions
    interpolated; Gemma-3's global layers). `linear` takes `factor` alone."""

    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_SCALINGS:
            raise ValueError(
                f"RopeScaling.rope_type={self.rope_type!r}; choose one of {ROPE_SCALINGS}"
            )
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be positive, got {self.factor}")
        llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        given = [getattr(self, name) is not None for name in llama3]
        if self.rope_type == "llama3" and not all(given):
            raise ValueError(f"RopeScaling(rope_type='llama3') needs {', '.join(llama3)}")
        if self.rope_type == "linear" and any(given):
            raise ValueError(f"RopeScaling(rope_type='linear') takes factor alone, not {llama3}")


@dataclasses.dataclass(frozen=True)
class ModelConfig(ModelPresets):
    """Shapes and numerics of a decoder-only transformer of the Llama family.

    `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype of
    activations and matmuls (fp32 params with bf16 compute is the usual training setup).

    Presets (`ModelConfig.tiny()`, `ModelConfig.llama3_2_1b()`, ...) come from
    `jaxcai.model_presets`.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int | None = None  # defaults to d_model // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v projections
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    sliding_window: int | None = None  # local attention window, in tokens (q - k < window)
    # Per-layer attention kinds, Hugging Face's `layer_types` (Gemma-3): "sliding_attention"
    # layers attend within `sliding_window` and rotate by `rope_local_theta`;
    # "full_attention" layers attend to everything and rotate by `rope_theta` and
    # `rope_scaling`. None: all layers alike (windowed when `sliding_window` is set).
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers (None: rope_theta)
    qk_norm: bool = False  # Qwen3, Gemma-3: RMSNorm over each head of q and k before RoPE
    # "llama": w * norm(x), w starting at 1; "gemma": (1 + w) * norm(x) in float32, w at 0.
    norm_style: str = "llama"
    post_norms: bool = False  # Gemma-3: the attention and MLP outputs are normed too
    mlp_activation: str = "silu"  # the gate's activation: "silu" (SwiGLU), "gelu_tanh"
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model), in the compute dtype
    query_pre_attn_scalar: float | None = None  # scores scaled by its ** -0.5 (None: head_dim)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    model_type: str = "llama"  # Hugging Face architecture used when saving
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    # Training losses compute logits this many positions at a time (0: all at once), so
    # the full [batch, length, vocab] float32 logits are never materialised. AUTO_CHUNK
    # (-1, the default) resolves on construction by the vocabulary (`auto_logits_chunk`).
    logits_chunk: int = AUTO_CHUNK
    # LoRA (Hu et al. 2021): rank-`lora_rank` adapters on the `lora_targets` projections,
    # scaled by lora_alpha / lora_rank; 0 disables. With adapters, only they are trained.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    attention_impl: str | None = None  # None lets JAX pick (cuDNN flash attention on GPU)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"ModelConfig: d_model={self.d_model} is not divisible by "
                    f"n_heads={self.n_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.layer_types is not None:  # a YAML list -> a hashable tuple
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"ModelConfig.head_dim must be positive and even (RoPE), got {self.head_dim}"
            )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"ModelConfig.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}"
            )
        targets = self.lora_targets  # a YAML list or a single name -> a hashable tuple
        object.__setattr__(
            self, "lora_targets", (targets,) if isinstance(targets, str) else tuple(targets)
        )
        if self.lora_rank < 0:
            raise ValueError(f"ModelConfig.lora_rank must be >= 0, got {self.lora_rank}")
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if unknown or (self.lora_rank and not self.lora_targets):
            raise ValueError(
                f"ModelConfig.lora_targets={list(self.lora_targets)}: choose a non-empty "
                f"subset of {list(LORA_TARGETS)}"
            )
        if self.logits_chunk == AUTO_CHUNK:
            object.__setattr__(self, "logits_chunk", auto_logits_chunk(self.vocab_size))
        if self.logits_chunk < 0:
            raise ValueError(
                f"ModelConfig.logits_chunk must be >= 0 or {AUTO_CHUNK} (auto), "
                f"got {self.logits_chunk}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r}; "
                f"choose one of {ATTENTION_IMPLS}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"ModelConfig.model_type={self.model_type!r}; choose one of {MODEL_TYPES}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError("ModelConfig.sliding_window must be positive or None")
        self._check_architecture()
        for name in ("param_dtype", "dtype"):
            try:
                if not isinstance(getattr(self, name), str):
                    raise TypeError
                jnp.dtype(getattr(self, name))
            except TypeError as e:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r} is no dtype") from e

    def _check_architecture(self) -> None:
        """The Qwen3 / Gemma-3 fields."""
        if self.layer_types is not None:
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(
                    f"ModelConfig.layer_types: unknown kinds {unknown}; choose from {LAYER_TYPES}"
                )
            if len(self.layer_types) != self.n_layers:
                raise ValueError(
                    f"ModelConfig.layer_types has {len(self.layer_types)} entries for "
                    f"n_layers={self.n_layers}"
                )
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError(
                    "ModelConfig.layer_types names sliding_attention layers but "
                    "sliding_window is None"
                )
        if self.norm_style not in NORM_STYLES:
            raise ValueError(
                f"ModelConfig.norm_style={self.norm_style!r}; choose one of {NORM_STYLES}"
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"ModelConfig.mlp_activation={self.mlp_activation!r}; "
                f"choose one of {MLP_ACTIVATIONS}"
            )
        for name in ("rope_local_theta", "query_pre_attn_scalar", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be positive or None, got {value}")

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer, whether `layer_types` makes it a sliding-window layer."""
        if self.layer_types is None:
            return (False,) * self.n_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """Per layer, the attention window in tokens (None: unlimited)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.n_layers
        return tuple(self.sliding_window if local else None for local in self.local_layers)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a plain mapping (a Hydra/OmegaConf node works); unknown keys fail."""
        values = dict(values)
        values.pop("_target_", None)
        values.pop("name", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"ModelConfig: unknown fields {unknown}; known fields are {sorted(known)}"
            )
        if values.get("rope_scaling") is not None:
            values["rope_scaling"] = RopeScaling(**dict(values["rope_scaling"]))
        return cls(**values)  # lists (layer_types, lora_targets) become tuples


PRESETS = {
    "tiny": ModelConfig.tiny,
    "small": ModelConfig.small,
    "bench_ref": ModelConfig.bench_ref,
    "llama3.2-1b": ModelConfig.llama3_2_1b,
    "llama3.1-8b": ModelConfig.llama3_1_8b,
    "qwen2.5-0.5b": ModelConfig.qwen2_5_0_5b,
    "qwen2.5-7b": ModelConfig.qwen2_5_7b,
    "mistral-7b": ModelConfig.mistral_7b,
    "qwen3-0.6b": ModelConfig.qwen3_0_6b,
    "qwen3-1.7b": ModelConfig.qwen3_1_7b,
    "qwen3-4b": ModelConfig.qwen3_4b,
    "qwen3-8b": ModelConfig.qwen3_8b,
    "gemma3-1b": ModelConfig.gemma3_1b,
    "gemma3-4b": ModelConfig.gemma3_4b,
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name (`tiny`, `small`, `llama3.2-1b`, ...), with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


def param_count(config: ModelConfig) -> int:
    """Number of parameters of the language model (reward head excluded)."""
    d, h, hd = config.d_model, config.n_heads, config.head_dim
    kv = config.n_kv_heads
    attn = d * hd * (h + 2 * kv) + h * hd * d
    if config.qkv_bias:
        attn += hd * (h + 2 * kv)
    if config.out_bias:
        attn += d
    if config.qk_norm:
        attn += 2 * hd
    mlp = 3 * d * config.d_ff + (2 * config.d_ff + d if config.mlp_bias else 0)
    per_layer = attn + mlp + (4 if config.post_norms else 2) * d
    embed = config.vocab_size * d
    head = 0 if config.tie_embeddings else d * config.vocab_size
    return embed + head + config.n_layers * per_layer + d


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

    The standard estimate `6 * N + 6 * n_layers * seq_len * n_heads * head_dim`:
    `6 N` counts the weight matmuls (2 FLOPs per multiply-add, forward plus a backward
    twice as costly), where N is every parameter used in a matmul: all parameters minus
    the input embedding table (a lookup), plus the output projection even when it is tied
    to that table. The attention term is the `Q K^T` and `A V` matmuls,
    `2 * 2 * seq_len * n_heads * head_dim` per layer and token forward, times 3 for
    training, halved because a causal mask leaves half the score matrix unused. A layer
    with a window `w < seq_len` attends to `w - w**2 / (2 * seq_len)` keys per query on
    average instead of `seq_len / 2` (the same at `w = seq_len`).
    Norms, RoPE and softmax are left out (they are a few percent at most).
    """
    embed = config.vocab_size * config.d_model
    n_matmul = param_count(config) - embed + (embed if config.tie_embeddings else 0)
    keys = sum(
        seq_len / 2 if w is None or w >= seq_len else w - w * w / (2 * seq_len)
        for w in config.layer_windows
    )
    attention = 12 * keys * config.n_heads * config.head_dim
    return 6.0 * n_matmul + attention
