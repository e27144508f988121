#!/usr/bin/env bash
# HOW+ASMK vs global descriptors (and their fusion and the reranker) on the real sets in
# ../shared/data, with the default offline backbone (EfficientNet-Lite0, ImageNet): mean +- std
# over 5 repeats (codebook seed and fold split), the README's tables.
#   eval/compare_shared.sh [WORK_ROOT]
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
DATA=${HOW_MET_SHARED_DATA:-$HERE/../shared/data}
WORK=${1:-shared-eval}
for set in museum landmarks grocery; do
  how-met evaluate --data "$DATA/$set" --cv 2 --repeats 5 --work "$WORK/$set"
done
