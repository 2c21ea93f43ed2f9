#!/usr/bin/env bash
# The GPU check (issue 24), one command on a CUDA machine with this checkout and its .venv (scripts/setup.sh):
#   bash bench/gpu_check.sh [OUT]
# 1. the smoke DAG end to end on the GPU; 2. three training steps of a random Mistral-7B-shaped model at the
# paper's micro-batch (16 x 2048, bf16, checkpointing) with peak memory against the plan, and the same without
# checkpointing at the largest micro-batch the plan says fits; 3. SmolLM2's greedy outputs on the GPU against the
# CPU's in fp32; 4. bench_eval and bench_train. Prints one table per part; writes logs under OUT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-${OUT:-/tmp/moa-gpu-check}}
mkdir -p "$OUT"
# shellcheck disable=SC1091
. .venv/bin/activate
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "## 1. smoke DAG on the GPU"
start=$(date +%s)
snakemake --cores 8 --configfile config/smoke.yaml --config results_dir="$OUT/smoke" > "$OUT/smoke.log" 2>&1
echo "| smoke DAG | $(( $(date +%s) - start )) s | $(ls "$OUT"/smoke/smoke/eval | wc -l) compositions evaluated |"

echo "## 2. paper-scale training steps (tokens/s, peak vs plan)"
python -m bench.bench_paper_step --preset mistral-7b --rows 16 --seq-len 2048 | tee "$OUT/paper_step.md"
python -m bench.bench_paper_step --preset mistral-7b --rows 2 --seq-len 2048 --no-checkpointing | tail -1 \
    | tee -a "$OUT/paper_step.md"
moa plan --config config/paper.yaml --model-config mistral-7b > "$OUT/plan_paper.txt" || true
moa plan --config config/thesis.yaml --model-config qwen2-1.5b > "$OUT/plan_thesis.txt" || true

echo "## 3. greedy outputs on the GPU = the CPU's (fp32, SmolLM2-135M)"
python - <<'PY' | tee "$OUT/outputs_equal.md"
import torch
from moa.generate import greedy
from moa.model import load_pretrained
prompts = [f"Question {i}: what is {i} plus {2 * i}? Answer:" for i in range(16)]
outputs = {}
for device in ("cpu", "cuda"):
    model, tokenizer = load_pretrained(None, torch.float32)
    model.to(device)
    outputs[device] = greedy(model, tokenizer, [tokenizer.encode(p) for p in prompts], 32)
same = sum(a == b for a, b in zip(outputs["cpu"], outputs["cuda"]))
print(f"| greedy outputs equal, GPU vs CPU (fp32) | {same}/{len(prompts)} |")
PY

echo "## 4. bench_eval and bench_train"
python -m bench.bench_eval > "$OUT/bench_eval.md" 2>&1 && tail -n 12 "$OUT/bench_eval.md"
python -m bench.bench_train > "$OUT/bench_train.md" 2>&1 && tail -n 12 "$OUT/bench_train.md"
