"""Tunix's `DPOTrainer` on the pairs `benchmarks/pairs.py` trains on (run in an
environment with `google-tunix`; it does not import jaxcai).

    $VENV_TUNIX/bin/python benchmarks/tunix_pairs.py --records pairs.jsonl \\
        --anchor ../shared/anchors/tunix_bench.py --batch-size 8 --max-len 1024

Records are `{"prompt": ids, "chosen": ids, "rejected": ids}` lines, already cut to fit.
The model, its re-drawn random init and the step timing hooks are those of the anchor
harness of the reference workload (`--anchor`). Each batch is padded to its own longest
prompt (left) and longest response (right; `DPOTrainer` stacks chosen and rejected), the
best its fixed-shape inputs allow, so every new pair of lengths compiles a new program.
One untimed pass over the batches compiles every shape; `--passes` timed passes follow.
Prints one `RESULT {json}` line: steady-state `pairs_per_s`, `compiles` (distinct
shapes), `padding_share` of the computed slots.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import numpy as np


def _anchor(path: str):
    spec = importlib.util.spec_from_file_location("tunix_anchor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(dpo_trainer, pairs: list[dict], pad_id: int):
    """One `TrainingInput`: prompts left-padded, responses right-padded, to the batch's
    longest of each."""
    n = len(pairs)
    p_len = max(len(p["prompt"]) for p in pairs)
    r_len = max(len(p[s]) for p in pairs for s in ("chosen", "rejected"))
    prompt = np.full((n, p_len), pad_id, np.int32)
    arrays = {s: np.full((n, r_len), pad_id, np.int32) for s in ("chosen", "rejected")}
    masks = {k: np.zeros_like(v) for k, v in arrays.items()}
    prompt_mask = np.zeros_like(prompt)
    for i, p in enumerate(pairs):
        prompt[i, p_len - len(p["prompt"]) :] = p["prompt"]
        prompt_mask[i, p_len - len(p["prompt"]) :] = 1
        for s in ("chosen", "rejected"):
            arrays[s][i, : len(p[s])] = p[s]
            masks[s][i, : len(p[s])] = 1
    real = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    batch = dpo_trainer.TrainingInput(
        prompt_ids=prompt, prompt_mask=prompt_mask,
        chosen_ids=arrays["chosen"], chosen_mask=masks["chosen"],
        rejected_ids=arrays["rejected"], rejected_mask=masks["rejected"],
    )  # fmt: skip
    return batch, (p_len, r_len), real, 2 * n * (p_len + r_len)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", required=True)
    p.add_argument("--anchor", required=True, help="the Tunix harness of the reference workload")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--passes", type=int, default=1)
    args = p.parse_args()

    anchor = _anchor(args.anchor)
    import optax
    from tunix.sft.dpo import dpo_trainer

    with open(args.records) as f:
        pairs = [json.loads(x) for x in f]
    n = len(pairs) - len(pairs) % args.batch_size
    batches = [
        _batch(dpo_trainer, pairs[i : i + args.batch_size], anchor.PAD_ID)
        for i in range(0, n, args.batch_size)
    ]
    steps_per_pass = len(batches)
    data = [b[0] for b in batches] * (1 + args.passes)
    model, _ = anchor.build_model()
    ref_model, _ = anchor.build_model()
    tcfg = dpo_trainer.DPOTrainingConfig(
        eval_every_n_steps=10**9, max_steps=len(data), pbar_description=None,
        algorithm="dpo", beta=0.1, max_inflight_computations=1,
    )  # fmt: skip
    trainer = dpo_trainer.DPOTrainer(
        model=model, ref_model=ref_model, optimizer=optax.adamw(1e-5), training_config=tcfg
    )
    hooks = anchor.TimingHooks()
    trainer.with_training_hooks(hooks)
    start = time.perf_counter()
    trainer.train(data)
    wall = time.perf_counter() - start
    marks = np.asarray([*hooks.starts, hooks.end])
    # Interval k runs step k; the first pass (steps 0 .. steps_per_pass - 1) compiles.
    timed = float(marks[-1] - marks[steps_per_pass])
    pairs_timed = args.passes * n
    real = sum(b[2] for b in batches)
    slots = sum(b[3] for b in batches)
    result = {
        "pairs_per_s": pairs_timed / timed,
        "seconds": timed,
        "first_pass_s": float(marks[steps_per_pass] - marks[0]),
        "compiles": len({b[1] for b in batches}),
        "padding_share": 1 - real / slots,
        "train_wall_s": wall,
        "api": "tunix.sft.dpo.dpo_trainer.DPOTrainer (algorithm=dpo, beta=0.1, frozen ref)",
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
