#!/usr/bin/env bash
# GPU checks with ranks sharing one GPU (docs/shared-gpu.md). One stage per call, each well
# under 10 minutes on one H200; outputs go to $OUT (or ./runs/gpu_shared).
#   bash .ci/gpu_shared.sh suite       # the whole gpu suite in one run (about 6.5 min)
#   bash .ci/gpu_shared.sh attention   # gpu suite, part: multi-rank attention + documents
#   bash .ci/gpu_shared.sh models      # gpu suite, part: HF + DeepSpeed adapters, kernel tests
#   bash .ci/gpu_shared.sh bench-packed  # bench packed before/after the tiny-call fix (1 rank)
#   bash .ci/gpu_shared.sh bench-shared 2  # bench e2e and bench packed, 2 (or 4) ranks on 1 GPU
#   bash .ci/gpu_shared.sh bench-ring    # bench ring at 64K and 256K, 2 and 4 ranks on 1 GPU
#   bash .ci/gpu_shared.sh bench-window  # bench window: attention 64K/256K, 1.1B Mistral e2e
# DeepSpeed is installed from wheels under shared/wheels when present (the GPU image has none).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_shared}"
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree, not an installed copy
if ls shared/wheels/*.whl >/dev/null 2>&1; then
    python -m pip install -q --no-index --find-links shared/wheels deepspeed >/dev/null 2>&1 \
        || echo "deepspeed wheels did not install: the DeepSpeed tests will skip"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

run_suite() {  # files...
    local t0=$SECONDS
    python -m pytest -q -s -m gpu -p no:cacheprovider --durations=20 "$@" 2>&1 \
        | tee "$out/gpu_suite_$1.log" | grep -E "GPU-ERR|passed|failed|skipped|Error|error|slowest|s call" 
    echo "wall time of this part: $((SECONDS - t0)) s"
}

case "${1:-}" in
suite)
    run_suite tests
    ;;
attention)
    run_suite tests/test_gpu_multirank.py tests/test_gpu_documents.py
    ;;
models)
    run_suite tests/test_gpu_models.py tests/test_gpu.py tests/test_gpu_window.py
    ;;
bench-packed)
    # before / after the tiny-call fix on the packed rows (one process): attention rows, then
    # the end-to-end 8 x 4K and mixed rows of seqpar_ring alone; then 2 and 4 ranks
    for rows in 1 64; do
        timeout 150 python -m seqpar_ring.bench packed --skip-e2e --fused-min-rows "$rows" \
            --out "$out/packed_w1_minrows$rows.json" 2>&1 | tail -8
        timeout 90 python -m seqpar_ring.bench packed --skip-attention --e2e-impls seqpar_ring \
            --e2e-rows equal mixed --fused-min-rows "$rows" \
            --out "$out/packed_e2e_minrows$rows.json" 2>&1 | tail -4
    done
    ;;
bench-shared)
    # bench-shared [ranks]: one rank count per call (default 2), each part with its own limit.
    # torch's AdamW when ranks share a GPU (--adam auto): no JIT build of DeepSpeed's fused Adam
    n="${2:-2}"
    timeout 240 torchrun --nproc-per-node "$n" -m seqpar_ring.bench e2e --impl seqpar \
        --zero 2 --seq 65536 262144 --steps 2 --budget-s 60 --out "$out/e2e_shared$n.json" \
        2>&1 | tee "$out/e2e_shared$n.log" | grep -v Warning | tail -8
    # rank 0 also times the one-GPU rows and compiles FlexAttention references
    timeout 300 torchrun --nproc-per-node "$n" -m seqpar_ring.bench packed --skip-e2e \
        --out "$out/packed_shared$n.json" 2>&1 | tee "$out/packed_shared$n.log" \
        | grep -v Warning | tail -10
    ;;
bench-ring)
    for n in 2 4; do
        timeout 270 torchrun --nproc-per-node "$n" -m seqpar_ring.bench ring --seq 65536 262144 \
            --kernels cudnn --comms ring --no-torch-cp --ulysses-sizes --skip-check --iters 1 \
            --memory-seq 65536 --out "$out/ring_shared$n.json" 2>&1 | grep -v Warning | tail -16
    done
    ;;
bench-window)
    timeout 540 python -m seqpar_ring.bench window --profile --out "$out/window.json" 2>&1 \
        | grep -v Warning | tail -50
    ;;
*)
    echo "usage: $0 suite|attention|models|bench-packed|bench-shared|bench-ring|bench-window" >&2
    exit 2
    ;;
esac
