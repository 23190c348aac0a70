#!/usr/bin/env bash
# The GPU check: bf16, 8 mixed personas, the SmolLM2-135M and Qwen2.5-0.5B shapes (random
# weights), LoRA rank 16 and 256. One run, three JSON files and the printed tables.
#   benchmarks/gpu.sh [OUT_DIR]        (default: benchmarks/)
set -euo pipefail
out=${1:-benchmarks}
python=${PYTHON:-python3}
common=(--device cuda --dtype bfloat16 --personas 8 --batch-size 1024 --users 1024 --ratings 8192
        --per-request-ratings 16 --train --train-batch-size 32)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
"$python" benchmarks/simulator.py "${common[@]}" --shape smollm2 --rank 16 --out "$out/results-gpu-smollm2-r16.json"
"$python" benchmarks/simulator.py "${common[@]}" --shape qwen2.5-0.5b --rank 16 --out "$out/results-gpu-qwen0.5b-r16.json"
"$python" benchmarks/simulator.py "${common[@]}" --shape qwen2.5-0.5b --rank 256 --out "$out/results-gpu-qwen0.5b-r256.json"
