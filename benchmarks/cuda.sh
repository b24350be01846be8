#!/usr/bin/env bash
# What runs on a GPU machine, from the repository root: build the kernels in place,
# then the parts named in $PARTS (default all): "tests" (tests/test_cuda.py), "bench"
# (the benchmark on CUDA), "x8" (batches x8), "scale" (the --scale probes on CUDA),
# "profile" (one sampled cnn step under torch.profiler). Text goes to $OUT/log.txt,
# the benchmark's JSON beside it.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/actstats-cuda}
PARTS=${PARTS:-tests bench x8 scale profile}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "the kernels did not build"
python3 -c "import torch, actstats.native as n; print('torch', torch.__version__, 'kernels', n.kernels is not None)"
methods=plain,handwritten,actstats_unsampled,actstats_stats,actstats_hist,actstats_nonfinite,actstats_probe
for part in $PARTS; do
  echo "=== $part"
  case $part in
    tests) timeout 200 python3 -m pytest -q -rf -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40 ;;
    bench) timeout 200 python3 benchmarks/overhead.py --device cuda --methods $methods --steps 20 \
             --json "$OUT/cuda.json" ;;
    x8) timeout 120 python3 benchmarks/overhead.py --device cuda --methods $methods --steps 10 --batch-scale 8 \
          --no-rss --json "$OUT/cuda_x8.json" ;;
    scale) timeout 150 python3 benchmarks/overhead.py --device cuda --scale --json "$OUT/cuda_scale.json" ;;
    profile) timeout 60 python3 - <<'EOF'
# Where a sampled cnn step's time goes on CUDA: operations by their own CPU time.
import sys
sys.path.insert(0, "benchmarks")
import torch
import actstats
from overhead import build, forward_backward

torch.set_num_threads(2)
model, x = build("cnn", "cuda")
with actstats.watch(model, every=1) as w:
    for _ in range(3):
        forward_backward(model, x); w.step(); model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        forward_backward(model, x); w.step()
        torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
EOF
    ;;
  esac
done
