#!/usr/bin/env bash
# Continue the shipped classifier on one GPU machine: prepare fresh synthetic studies on all
# CPU cores (one models.prepare per core, crops cut by the shipped two-pass segmentation and by
# the ground truth), then train on the GPU with a time budget. Run from the repository root:
#
#   OUT=results bash models/experiments/2026-11-27-gpu-classifier/run.sh
#
# Environment (defaults in brackets): PY [python3], WORK [/tmp/cspine-gpu], WORKERS [nproc],
# VAL_WORKERS [4], PREP_S [200] seconds of preparation, TRAIN_MIN [4] minutes of training,
# DEVICE [cuda], SEED0 [40000] first training seed, PER [300] seeds per worker, VAL_SEEDS
# [12000:12060] (the validation studies of phases C and D), LR [1e-3], BATCH [64].
set -uo pipefail
PY=${PY:-python3}
WORK=${WORK:-/tmp/cspine-gpu}
OUT=${OUT:?set OUT to the results folder}
WORKERS=${WORKERS:-$(nproc)}
VAL_WORKERS=${VAL_WORKERS:-4}
PREP_S=${PREP_S:-200}
TRAIN_MIN=${TRAIN_MIN:-4}
DEVICE=${DEVICE:-cuda}
SEED0=${SEED0:-40000}
PER=${PER:-300}
VAL_SEEDS=${VAL_SEEDS:-12000:12060}
LR=${LR:-1e-3}
BATCH=${BATCH:-64}
INIT=models/cspine-v1/checkpoints/frac.pt
mkdir -p "$WORK/train" "$WORK/val" "$OUT"
deadline=$((SECONDS + PREP_S))

prep() {  # cache seeds crops jitters fracture-rate log
    local left=$((deadline - SECONDS))
    [ "$left" -gt 5 ] || return 0
    timeout "$left" "$PY" -m models.prepare synthetic --seeds "$2" --via-memory --no-compress \
        --crops "$3" --jitters "$4" --fracture-rate "$5" --model-dir models/cspine-v1 \
        --cache "$1" --no-progress >>"$6" 2>&1
}

# Validation first (served crops only, fracture rate 0.5, as in phases C and D), split over
# VAL_WORKERS; every worker then prepares its own block of training seeds until the deadline.
v0=${VAL_SEEDS%%:*}; v1=${VAL_SEEDS##*:}; vstep=$(( (v1 - v0 + VAL_WORKERS - 1) / VAL_WORKERS ))
for w in $(seq 0 $((WORKERS - 1))); do
    (
        if [ "$w" -lt "$VAL_WORKERS" ]; then
            a=$((v0 + w * vstep)); b=$((a + vstep)); [ "$b" -le "$v1" ] || b=$v1
            [ "$a" -lt "$b" ] && prep "$WORK/val" "$a:$b" served 0 0.5 "$WORK/prep-$w.log"
        fi
        s=$((SEED0 + w * PER))
        prep "$WORK/w$w" "$s:$((s + PER))" both 1 0.6 "$WORK/prep-$w.log"
    ) &
done
wait
find "$WORK" -name '*.tmp.npz' -delete  # studies cut off by the deadline
{
    # A worker prepares its block in order, so its study count gives the seeds it covered
    # (unless the log names a seed that failed to generate).
    for w in $(seq 0 $((WORKERS - 1))); do
        n=$(ls "$WORK/w$w" 2>/dev/null | wc -l); s=$((SEED0 + w * PER))
        echo "worker $w: training seeds $s:$((s + n)) ($n studies)"
        [ "$n" -gt 0 ] && mv "$WORK/w$w"/*.npz "$WORK/train/"
    done
    echo "prepared in $SECONDS s: $(ls "$WORK/train" | wc -l) training, $(ls "$WORK/val" | wc -l) validation studies"
    grep -h -E "failed|Error|error" "$WORK"/prep-*.log | head -20
} | tee "$OUT/prep.log"

# Mixed precision smoke (the real-data path at a hospital): a few steps on the validation cache.
timeout 90 "$PY" -m models.train --cache "$WORK/val" --val-cache "$WORK/val" --out "$WORK/amp" \
    --stages frac --frac-steps 40 --frac-batch "$BATCH" --eval-every 40 --device "$DEVICE" \
    --amp --init-frac "$INIT" --no-progress >"$OUT/amp.log" 2>&1
echo "amp smoke exit $?" | tee -a "$OUT/prep.log"

timeout "$(awk "BEGIN{print int($TRAIN_MIN * 60 + 120)}")" "$PY" -m models.train --cache "$WORK/train" \
    --val-cache "$WORK/val" --out "$OUT/run" --stages frac --frac-steps 1000000 \
    --frac-minutes "$TRAIN_MIN" --frac-batch "$BATCH" --lr "$LR" --eval-every 300 \
    --device "$DEVICE" --threads 4 --init-frac "$INIT" --no-progress 2>&1 | tee "$OUT/train.log"
echo "train exit ${PIPESTATUS[0]} after $SECONDS s" | tee -a "$OUT/prep.log"
