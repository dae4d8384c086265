#!/usr/bin/env bash
# End-to-end training, flaxvision vs the same model and recipe in plain PyTorch eager: the two rows of
# BENCHMARKS.md. Each row generates its dataset (MNIST-sized: 60k train / 10k test, 28x28x1; CIFAR-sized: 50k /
# 10k, 32x32x3; seed 0) into a temporary directory, trains 2 epochs on each side in fresh processes one after the
# other and prints the table; epoch 2 gives the images/s without the first epoch's compilation.
#
#     benchmarks/e2e.sh                 # both rows; the JSON of each goes to e2e-<preset>.json too
#     benchmarks/e2e.sh --set workers=0 # extra arguments go to both rows (recipe overrides, --torch-threads 1, ...)
#
# Minutes each on a few CPU cores (ResNet-18 most). Run on an otherwise idle machine: torch's OpenMP threads spin
# while they wait for each other, and lose several-fold on cores another process is using.
set -euo pipefail
PYTHON=${PYTHON:-python}
OUT=${OUT:-.}

run() {
    local preset=$1
    shift
    "$PYTHON" -m flaxvision.cli bench e2e --preset "$preset" "$@" --json >"$OUT/e2e-$preset.json"
    "$PYTHON" - "$OUT/e2e-$preset.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
fv, tr = r["flaxvision"], r["torch"]
print(f"| {r['preset']} | {fv['images_per_second']:.0f} | {tr['images_per_second']:.0f} | "
      f"{r['ratio']['images_per_second']:.2f}x | {fv['wall_seconds']:.0f} / {tr['wall_seconds']:.0f} | "
      f"{fv['final_accuracy']:.4f} / {tr['final_accuracy']:.4f} | {r['machine']['cpu']}, {r['machine']['cores']} cores |")
PY
}

echo "| preset | flaxvision images/s | torch images/s | ratio | wall s (fv / torch) | test acc (fv / torch) | machine |"
echo "|---|---|---|---|---|---|---|"
run mnist-cnn --generate 60000 --test-size 10000 --epochs 2 "$@"
run cifar10-resnet18 --generate 50000 --test-size 10000 --epochs 2 "$@"
