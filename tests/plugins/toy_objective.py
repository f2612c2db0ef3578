"""A toy objective registered from outside the library (tests/test_objectives.py):
length-normalised SFT, where every response counts the same however long it is (the
mean over responses of each response's mean token loss), weighted by responses."""

from __future__ import annotations

import jax.numpy as jnp

from jaxcai import objectives


def length_normalised_sft(mc, oc, params, batch, ref_params=None):
    logps, _ = objectives.token_logps_of(
        mc, params, objectives.model_inputs(batch), batch["targets"]
    )
    mask = batch["mask"].astype(jnp.float32)
    per_row = -(logps * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    present = (mask.sum(-1) > 0).astype(jnp.float32)
    responses = present.sum()
    loss = (per_row * present).sum() / jnp.maximum(responses, 1.0)
    return loss, {"loss": loss, "responses": responses}


objectives.register(
    objectives.Objective(
        "sft_length_norm",
        "sft",
        length_normalised_sft,
        weight="responses",
        doc="SFT with every response weighted equally",
    )
)
