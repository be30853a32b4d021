#!/usr/bin/env bash
# The few-shot benchmark recorded in BENCHMARKS.md ("Few-shot grid on vlkit-tiny").
#
#   bench/fewshot_grid.sh                 # every step, then the merged report
#   bench/fewshot_grid.sh small b2n-group # chosen steps (e.g. two queues on two cores)
#   bench/fewshot_grid.sh report          # merge the finished steps (small, clipart and many needed)
#
# Every step is resumable (rerun to finish an interrupted one). Each process runs one
# torch thread so that two queues share the 2 cores without oversubscription.
#
# Compute budget: 2 CPU cores (no GPU). A CoOp step runs the 6-layer MiniLM text tower
# on every class prompt (M=16 context tokens + the name), so its cost grows with the
# class count, and the number of steps grows with it too (batch 32). Hence:
#   small     emoji-group (9 classes), emoji-skintone (5): every method but CoCoOp,
#             shots 1 2 4 8 16, seeds 1 2 3, each paper's own recipe (CoOp 50/100/200
#             epochs, CLIP-Adapter 200, Tip-Adapter-F 20).
#   small-cocoop  CoCoOp on the same two tasks at its own recipe (10 epochs, batch 1),
#             shots 1 4 16 only: its evaluation costs test images x classes prompt
#             encodings (33k for emoji-group, ~2 min per run here).
#   clipart   clipart-category (48 classes): the same, except that CoOp, CoOp-CSC and
#             KgCoOp train 10 epochs at every shot count (the paper's 200 epochs at 16
#             shots would take ~50 min per seed per method here), and CoCoOp does not
#             run: its evaluation alone is test images x classes = 52k prompt encodings
#             per run.
#   many      emoji-subgroup (98), emoji-flags (270): the methods
#             that work on cached features (zero-shot, linear probe, Tip-Adapter(-F),
#             CLIP-Adapter) at their own recipes, with 16 cached views instead of 64
#             (image encodings grow with images x views); prompt learning at 98-270
#             classes does not fit the budget. emoji-label (1,906 classes, ~7,500
#             training images) did not fit the session that recorded BENCHMARKS.md.
#   b2n-group   base-to-new on emoji-group, 16 shots, every transferable method, papers' recipes.
#   b2n-clipart base-to-new on clipart-category, 16 shots; CoOp and KgCoOp at 10 epochs
#               (CoCoOp's own recipe is 10 epochs).
#   paper-small, paper-clipart   the same tasks under `--protocol paper` for the methods whose
#             official recipe differs (KgCoOp, CLIP-Adapter, Tip-Adapter(-F); src/vlkit/bench/protocols.py),
#             KgCoOp at its official 100 epochs, batch 128 (clipart too).
#   b2n-paper-group, b2n-paper-clipart   the CoCoOp experiment (issue #14): base-to-new under
#             `--protocol paper` for zero-shot, CoOp (4 tokens from "a photo of a", 200 epochs),
#             CoCoOp in fp32, with the official fp16 parameters (cocoop-fp16), with its meta-net
#             frozen at init (cocoop-frozen), and KgCoOp.
#   report-paper  vlkit's and the paper protocol's rows side by side (needs small, clipart and the paper steps).
#   domain    emoji-group, 16 shots: train on Twemoji + Noto (the training styles),
#             test on unused training-style images (source) and on Facebook (target);
#             without CoCoOp (source + target = 5,640 images x 9 classes per run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/grid}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
VLKIT=".venv/bin/vlkit"
SEEDS=(--model vlkit-tiny --seeds 1 2 3)
COMMON=("${SEEDS[@]}" --views 64)
FEATURE_METHODS=(zeroshot zeroshot-ensemble linear-probe tip-adapter tip-adapter-f clip-adapter)
TEN='{"coop": {"epochs": 10}, "coop-csc": {"epochs": 10}, "kgcoop": {"epochs": 10}}'
TRANSFER=(zeroshot coop kgcoop cocoop clip-adapter)
PAPER_METHODS=(kgcoop clip-adapter tip-adapter tip-adapter-f)
COCOOP_EXPERIMENT=(zeroshot coop cocoop cocoop-fp16 cocoop-frozen kgcoop)

step() {
  case "$1" in
    small) "$VLKIT" bench fewshot --tasks emoji-group emoji-skintone --shots 1 2 4 8 16 "${COMMON[@]}" \
             --methods "${FEATURE_METHODS[@]}" kgcoop coop coop-csc --out "$OUT/small" ;;
    small-cocoop) "$VLKIT" bench fewshot --tasks emoji-group emoji-skintone --shots 1 4 16 "${COMMON[@]}" \
             --methods cocoop --out "$OUT/small" ;;
    clipart) "$VLKIT" bench fewshot --tasks clipart-category --shots 1 2 4 8 16 "${COMMON[@]}" \
             --methods "${FEATURE_METHODS[@]}" kgcoop coop coop-csc --options "$TEN" --out "$OUT/clipart" ;;
    many) "$VLKIT" bench fewshot --tasks emoji-subgroup emoji-flags --shots 1 2 4 8 16 "${SEEDS[@]}" --views 16 \
             --methods "${FEATURE_METHODS[@]}" --out "$OUT/many" ;;
    b2n-group) "$VLKIT" bench base-to-new --tasks emoji-group --shots 16 "${COMMON[@]}" \
             --methods "${TRANSFER[@]}" --out "$OUT/b2n-group" ;;
    b2n-clipart) "$VLKIT" bench base-to-new --tasks clipart-category --shots 16 "${COMMON[@]}" \
             --methods "${TRANSFER[@]}" --options '{"coop": {"epochs": 10}, "kgcoop": {"epochs": 10}}' --out "$OUT/b2n-clipart" ;;
    domain) "$VLKIT" bench domain --tasks emoji-group --shots 16 "${COMMON[@]}" \
             --methods zeroshot linear-probe clip-adapter kgcoop coop --out "$OUT/domain" ;;
    paper-small) "$VLKIT" bench fewshot --tasks emoji-group emoji-skintone --shots 1 2 4 8 16 "${COMMON[@]}" --protocol paper \
             --methods "${PAPER_METHODS[@]}" --out "$OUT/small-paper" ;;
    paper-clipart) "$VLKIT" bench fewshot --tasks clipart-category --shots 1 2 4 8 16 "${COMMON[@]}" --protocol paper \
             --methods "${PAPER_METHODS[@]}" --out "$OUT/clipart-paper" ;;
    b2n-paper-group) "$VLKIT" bench base-to-new --tasks emoji-group --shots 16 "${COMMON[@]}" --protocol paper \
             --methods "${COCOOP_EXPERIMENT[@]}" --out "$OUT/b2n-group-paper" ;;
    b2n-paper-clipart) "$VLKIT" bench base-to-new --tasks clipart-category --shots 16 "${COMMON[@]}" --protocol paper \
             --methods "${COCOOP_EXPERIMENT[@]}" --out "$OUT/b2n-clipart-paper" ;;
    report-paper)
      "$VLKIT" bench report --from "$OUT/small" "$OUT/clipart" "$OUT/small-paper" "$OUT/clipart-paper" --out "$OUT/report-paper" \
        --tasks emoji-group emoji-skintone clipart-category --methods zeroshot "${PAPER_METHODS[@]}" \
        --average "Average (group, skintone, clipart)=emoji-group,emoji-skintone,clipart-category" \
        --average "Average (group, skintone)=emoji-group,emoji-skintone"
      "$VLKIT" bench report --from "$OUT/b2n-group-paper" "$OUT/b2n-clipart-paper" --out "$OUT/report-b2n-paper" ;;
    report)
      local have=()
      for d in small clipart many; do [[ -f "$OUT/$d/results.jsonl" ]] && have+=("$OUT/$d"); done
      "$VLKIT" bench report --from "${have[@]}" --out "$OUT/report" \
        --tasks emoji-group emoji-skintone clipart-category emoji-subgroup emoji-flags \
        --methods zeroshot zeroshot-ensemble linear-probe coop coop-csc cocoop kgcoop clip-adapter tip-adapter tip-adapter-f \
        --average "Average (5 tasks)=emoji-group,emoji-skintone,clipart-category,emoji-subgroup,emoji-flags" \
        --average "Average (group, skintone, clipart)=emoji-group,emoji-skintone,clipart-category" \
        --average "Average (group, skintone)=emoji-group,emoji-skintone"
      local b2n=()
      for d in b2n-group b2n-clipart; do [[ -f "$OUT/$d/results.jsonl" ]] && b2n+=("$OUT/$d"); done
      if ((${#b2n[@]})); then "$VLKIT" bench report --from "${b2n[@]}" --out "$OUT/report-b2n"; fi ;;
    *) echo "unknown step $1 (small small-cocoop clipart many b2n-group b2n-clipart paper-small paper-clipart b2n-paper-group b2n-paper-clipart domain report report-paper)" >&2; exit 2 ;;
  esac
}

steps=("$@")
((${#steps[@]})) || steps=(small small-cocoop clipart many b2n-group b2n-clipart domain report)
for s in "${steps[@]}"; do step "$s"; done
