#!/usr/bin/env bash
# Reproduce the published Met numbers of HOW (R18) + ASMK + kNN (SPEC section 4: test GAP 25.3,
# GAP- 47.6, ACC 50.9) and the R18 ImageNet-free global baseline on the same features.
#
#   eval/met_reproduce.sh MET_ROOT how_r18.pth [WORK_DIR] [DEVICE] [CODEBOOK]
#
# CODEBOOK: a codebook trained on other images with `how-met codebook --recipe how-r18-met-64k`
# (as the published one was, on SfM120k); without it the codebook is trained on the database
# with the official settings.
#
# MET_ROOT holds MET_database.json, valset.json, testset.json (directly or in ground_truth/)
# and the images (with or without an images/ level). (K, t) are tuned on val, measured on test.
# Every step resumes: re-run the script after an interruption.
set -euo pipefail
MET=${1:?usage: met_reproduce.sh MET_ROOT how_r18.pth [WORK_DIR] [DEVICE]}
CKPT=${2:?usage: met_reproduce.sh MET_ROOT how_r18.pth [WORK_DIR] [DEVICE]}
WORK=${3:-met-how-r18}
DEVICE=${4:-cuda}
CODEBOOK=(${5:+--codebook "$5"})

# The published setting (--config how-r18: README "Fidelity"): R18 HOW, 7 scales, 1000 features,
# images <= 1024 px (Met database images are <= 500 px and are never enlarged), official resize
# rule and image loading, 65,536-word codebook (256 points per word, seed 1234), query multiple
# assignment 5, 512-D global baseline.
how-met evaluate --met "$MET" --work "$WORK" --config how-r18 --checkpoint "$CKPT" "${CODEBOOK[@]}" \
    --device "$DEVICE" --skip-bad --methods global,how-asmk,fusion,global+rerank --report

# The mini database (38,307 images) in its own work directory:
# how-met evaluate --met "$MET" --mini --work "$WORK-mini" --config how-r18 --checkpoint "$CKPT" \
#     "${CODEBOOK[@]}" --device "$DEVICE" --skip-bad
