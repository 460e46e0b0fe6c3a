#!/usr/bin/env bash
# One prepared run on a CUDA machine: GPU tests, the default config in bf16/fp16 through the CLI,
# and the ResNet-50 benchmark. Wheels for packages the machine lacks may be carried in .whl/.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_data_fast.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
for p in 32 bf16 fp16; do
  python3 -m torchkiln train -q trainer.precision=$p output_dir=/tmp/runs name=digits-$p && \
    python3 -c "import json,glob; s=json.load(open(glob.glob('/tmp/runs/digits-$p/*/summary.json')[0])); print('$p', 'best val/accuracy', round(s['best'],4), 'seconds', round(s['seconds'],1))"
done 2>&1 | tee "$OUT/cli_cuda.log"
python3 benchmarks/gpu_check.py --quick 2>&1 | tee "$OUT/gpu_check.log"
python3 benchmarks/fsdp_gpu_check.py 2>&1 | tee "$OUT/fsdp_gpu_check.log"  # issue 23: FSDP, self-placed model
python3 benchmarks/gpu_check.py --quick --batch 256 --no-checkpoint 2>&1 | tee "$OUT/gpu_check_256.log"
python3 benchmarks/memory_check.py --out "$OUT/memory_check.md" 2>&1 | tail -40 > "$OUT/memory_check.log"
{ python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_predict.py; python3 benchmarks/predict_export.py --images 4096 --size 64 --device cuda --out "$OUT/predict_export.md"; } 2>&1 | tail -30 | tee "$OUT/predict_export.log"
