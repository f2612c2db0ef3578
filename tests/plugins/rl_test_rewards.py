"""Reward functions for tests/test_rl.py (`reward.fn=rl_test_rewards:NAME`)."""


def fails_on_marker(prompts, responses):
    if any("MARK" in r for r in responses):
        raise ValueError("marker")
    return [0.0] * len(responses)


def nan_on_marker(prompts, responses):
    return [float("nan") if "MARK" in r else 1.0 for r in responses]


def concise_then_kill(prompts, responses):
    """`concise` rewards; when the file `$RL_KILL_FILE` holds N, the N-th call (counted in
    the file) deletes it and kills this process with SIGKILL (a crash mid-run)."""
    import os
    import signal
    from pathlib import Path

    from jaxcai.rl.example_rewards import concise

    path = Path(os.environ.get("RL_KILL_FILE", "/nonexistent"))
    if path.is_file():
        left = int(path.read_text()) - 1
        if left <= 0:
            path.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        path.write_text(str(left))
    return concise(prompts, responses)
