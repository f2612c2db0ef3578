#!/usr/bin/env bash
# The GPU figures of issues 7 and 16 in one go (H100/H200): bf16 compute, the Llama-3.2-1B shape with
# random weights, sequence 2048. Each program's last JSON line goes to $OUT/<name>.json.
#   OUT=gpu-results bash benchmarks/gpu.sh
# Then record the figures, with the date and the device, in benchmarks/README.md.
set -euo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
one_b="model=llama3.2-1b model.dtype=bfloat16 model.param_dtype=float32"
run() {
  local name=$1; shift
  echo "== $name: $*"
  python "$@" hydra.run.dir="$OUT/$name" 2>&1 | tee "$OUT/$name.log" | tail -1 > "$OUT/$name.json"
  cat "$OUT/$name.json"
}
# SFT step MFU (target >= 55% of the published bf16 peak) and DPO/RM steps.
run sft -m benchmarks.train_step objective=sft $one_b seq_len=2048 prompt_len=256 \
  batch_size=8 model.remat_policy=dots_no_batch model.logits_chunk=512 matmul_size=8192
run dpo -m benchmarks.train_step objective=dpo $one_b seq_len=2048 prompt_len=256 \
  batch_size=4 model.remat_policy=dots_no_batch model.logits_chunk=512 matmul_size=8192
run rm -m benchmarks.train_step objective=rm $one_b seq_len=2048 prompt_len=256 \
  batch_size=4 model.remat_policy=dots_no_batch matmul_size=8192
# DPO on real-length pairs (synthetic hh-rlhf lengths): packed vs bucketed vs fixed padding,
# with cuDNN attention (the packed rows' branch mask reaches cuDNN as a dense bias).
run pairs -m benchmarks.pairs $one_b model.attention_impl=cudnn model.remat_policy=dots_no_batch \
  batch_size=16 batches=8 fixed_batches=2 max_len=1024
# The mixed-length sampler (budgets 10-256): continuous batching vs the static sampler.
run generate_mixed -m benchmarks.generate $one_b model.param_dtype=bfloat16 batch_sizes=[32] \
  headline_batch=32 compare_hf=false
# Decode at batch 1 against the HBM-bandwidth bound (target >= 70%).
run generate -m benchmarks.generate $one_b model.param_dtype=bfloat16 batch_sizes=[1,8] \
  headline_batch=1 prompt_len=128 new_tokens=256 compare_hf=false
# The compiled memory of an 8B LoRA DPO step on this device, next to the CPU plan.
run aot_8b_lora -m jaxcai.main.aot model=llama3.1-8b objective=dpo data=preferences \
  data.max_len=2048 trainer.batch_size=8 trainer.grad_accum=8 model.dtype=bfloat16 \
  model.param_dtype=bfloat16 model.lora_rank=16 model.remat_policy=full model.logits_chunk=512
