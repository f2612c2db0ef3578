"""Reward functions for tests/test_rl.py (`reward.fn=rl_test_rewards:NAME`)."""


def fails_on_marker(prompts, responses):
    if any("MARK" in r for r in responses):
        raise ValueError("marker")
    return [0.0] * len(responses)


def nan_on_marker(prompts, responses):
    return [float("nan") if "MARK" in r else 1.0 for r in responses]
