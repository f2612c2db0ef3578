"""Where each parameter lives in a Hugging Face checkpoint: the tensor names of our param
paths (plain and post-norm layer layouts, the text tower of a multimodal checkpoint), and
the reshapes between our layouts and torch's (`Linear` weights are `[out, in]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from jaxcai.model import param_shapes
from jaxcai.model_config import ModelConfig

__all__ = [
    "CAUSAL_LM",
    "Layout",
    "flat_paths",
    "hf_shape",
    "layout_of",
    "param_entries",
    "to_hf",
    "to_ours",
    "unflatten",
]

# Each parameter maps to one Hugging Face tensor (one per layer when layers are stacked).


def to_ours(kind: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A checkpoint tensor of `kind` in our layout `shape`."""
    if kind in ("in_proj", "out_proj"):  # [out, in] -> [in, out...]
        return a.T.reshape(shape)
    return a.reshape(shape)


def to_hf(kind: str, a: np.ndarray) -> np.ndarray:
    """One of our arrays of `kind` in the checkpoint's layout."""
    if kind == "in_proj":  # [D, N, H] or [D, F] -> [N*H or F, D]
        return a.reshape(a.shape[0], -1).T
    if kind == "out_proj":  # [N, H, D] or [F, D] -> [D, N*H or F]
        return a.reshape(-1, a.shape[-1]).T
    if kind == "flat":  # [N, H] bias -> [N*H]
        return a.reshape(-1)
    return a


_TOP = {
    ("embed",): ("embed_tokens.weight", "plain"),
    ("final_norm", "scale"): ("norm.weight", "plain"),
}
_LAYER = {
    ("attn", "q_kernel"): ("self_attn.q_proj.weight", "in_proj"),
    ("attn", "k_kernel"): ("self_attn.k_proj.weight", "in_proj"),
    ("attn", "v_kernel"): ("self_attn.v_proj.weight", "in_proj"),
    ("attn", "o_kernel"): ("self_attn.o_proj.weight", "out_proj"),
    ("attn", "q_bias"): ("self_attn.q_proj.bias", "flat"),
    ("attn", "k_bias"): ("self_attn.k_proj.bias", "flat"),
    ("attn", "v_bias"): ("self_attn.v_proj.bias", "flat"),
    ("attn", "o_bias"): ("self_attn.o_proj.bias", "plain"),
    ("mlp", "gate_kernel"): ("mlp.gate_proj.weight", "in_proj"),
    ("mlp", "up_kernel"): ("mlp.up_proj.weight", "in_proj"),
    ("mlp", "down_kernel"): ("mlp.down_proj.weight", "out_proj"),
    ("mlp", "gate_bias"): ("mlp.gate_proj.bias", "plain"),
    ("mlp", "up_bias"): ("mlp.up_proj.bias", "plain"),
    ("mlp", "down_bias"): ("mlp.down_proj.bias", "plain"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "plain"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "plain"),
    ("attn_norm", "scale"): ("input_layernorm.weight", "plain"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "plain"),
}
# Gemma-3 norms both sides of attention and MLP; its `post_attention_layernorm` is the
# attention output's norm, and the MLP's input norm is `pre_feedforward_layernorm`.
_POST_NORM_LAYER = {
    **_LAYER,
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "plain"),
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", "plain"),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", "plain"),
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a checkpoint keeps the decoder's tensors: `{prefix}layers.{i}....` and the
    untied output projection `head`."""

    prefix: str = "model."
    head: str = "lm_head.weight"


CAUSAL_LM = Layout()
# Multimodal Gemma-3: the text tower as transformers >= 4.52 holds it in memory, and as
# the hub checkpoints (and transformers' own save) name it.
_LAYOUTS = (
    CAUSAL_LM,
    Layout("model.language_model.", "lm_head.weight"),
    Layout("language_model.model.", "language_model.lm_head.weight"),
)


def layout_of(weight_map: dict[str, Any]) -> Layout:
    """The layout whose embedding table the checkpoint holds (else the plain one, so a
    missing tensor is reported by its usual name)."""
    for layout in _LAYOUTS:
        if f"{layout.prefix}embed_tokens.weight" in weight_map:
            return layout
    return CAUSAL_LM


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint's shape of a tensor of `kind` that is `shape` in our layout."""
    if kind == "in_proj":
        return (int(np.prod(shape[1:])), shape[0])
    if kind == "out_proj":
        return (shape[-1], int(np.prod(shape[:-1])))
    if kind == "flat":
        return (int(np.prod(shape)),)
    return tuple(shape)


def param_entries(
    config: ModelConfig, layout: Layout = CAUSAL_LM
) -> Iterator[tuple[tuple[str, ...], Any, list[str], str]]:
    """(our path, our shape-dtype, HF tensor names (one per layer if stacked), kind)."""
    shapes = param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    layer_names = _POST_NORM_LAYER if config.post_norms else _LAYER
    p = layout.prefix
    for keypath, sd in flat:
        path = tuple(k.key for k in keypath)
        if path == ("lm_head",):
            yield path, sd, [layout.head], "in_proj"
        elif path in _TOP:
            name, kind = _TOP[path]
            yield path, sd, [f"{p}{name}"], kind
        elif path[0] == "layers":
            name, kind = layer_names[path[1:]]
            yield path, sd, [f"{p}layers.{i}.{name}" for i in range(config.n_layers)], kind
        else:  # layers_{i}, unscanned
            i = int(path[0].removeprefix("layers_"))
            name, kind = layer_names[path[1:]]
            yield path, sd, [f"{p}layers.{i}.{name}"], kind


def flat_paths(tree: Any) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path of dict keys, leaf) of every leaf of a params-like tree."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield tuple(k.key for k in keypath), leaf


def unflatten(leaves: dict[tuple[str, ...], Any]) -> dict:
    """The nested dict whose `flat_paths` are `leaves`."""
    out: dict = {}
    for path, leaf in leaves.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out
