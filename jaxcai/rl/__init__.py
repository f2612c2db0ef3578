"""Online RL (RL-CAI): PPO, RLOO, GRPO and online DPO with rollouts sampled on the
training mesh from the params the train step updates.

Modules: `objectives` (the four records and their pure losses), `rollout` (sampling
and row layout), `rewards` (reward model, AI judge, user function; shaping),
`algorithms` (advantages and rollout metrics), `value` (PPO's value model), `prompts`
(the prompt stream and the checkpointed rollout state), `feed` (the batch source and
its hook). The math lives in `jaxcai.rl_losses`.
"""
