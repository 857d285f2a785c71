#!/usr/bin/env bash
# Issue 20's candidate recipe for the embedded model, as run since the thirtieth session
# (docs/embedded-model.md, "A separation margin for the encoder"): an encoder drawn with the separation
# term, the vae and decoder stages, the 8-block DiT's two phases, export, and the ratings. Every step is a
# `python -m mochi.train.tiny` stage or a benchmark, on one thread (bit-exact resumes; a draw belongs to its
# machine and thread count), and every one resumes from its checkpoint when run again.
#
#   scripts/embedded_candidate.sh draw SEED      the vae stage to step 1000 only, then the latent probe
#   scripts/embedded_candidate.sh vae SEED       the vae stage to its end (4200), then the decoder stage
#   scripts/embedded_candidate.sh dit SEED       the D8 DiT (24000 steps, then stage 2b's 6000) and export;
#                                                waits for the vae stage's step 1000 (the encoder is final
#                                                from there), so it can run beside `vae`
#   scripts/embedded_candidate.sh rate-vae SEED  PSNR, drift, ceiling, separation (issue 20's VAE targets)
#   scripts/embedded_candidate.sh rate-dit SEED  selection seeds 0-3 and 4-7 (two processes, one core each)
#
# RUNS (default: runs/, ignored by git) holds S<SEED>/ and the logs. The first call copies src/ to
# RUNS/code and every stage imports from there, so that editing the package does not change a run midway.
set -euo pipefail

usage="usage: $0 draw|vae|dit|rate-vae|rate-dit SEED"
case ${1:-} in
draw | vae | dit | rate-vae | rate-dit) cmd=$1 ;;
*) echo "$usage (not '${1:-}')" >&2 && exit 2 ;;
esac
[[ ${2:-} =~ ^[0-9]+$ ]] || { echo "$usage: SEED is a whole number (not '${2:-}')" >&2 && exit 2; }
seed=$2
root=$(cd "$(dirname "$0")/.." && pwd)
runs=$(realpath -m "${RUNS:-$root/runs}")
run=$runs/S$seed
py=${PYTHON:-python}
mkdir -p "$run"
[ -d "$runs/code" ] || cp -r "$root/src" "$runs/code"
export PYTHONPATH=$runs/code OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
cd "$root"

vae() {
    "$py" -m mochi.train.tiny vae --out "$run" --seed "$seed" --heldout-pixels --early-foreground-weight 3 \
        --separation-weight 0.1 --separation-margin 0.4 --threads 1
}

reached() {  # the vae stage has logged step $1 or later
    [ -f "$run/vae.log" ] && awk -v n="$1" '$1 == "vae" && $2 == "step" { split($3, s, "/"); if (s[1] + 0 >= n) f = 1 }
        END { exit !f }' "$run/vae.log"
}

case $cmd in
draw)
    if ! reached 1000; then
        vae &
        pid=$!
        until reached 1000 || ! kill -0 "$pid" 2>/dev/null; do sleep 15; done
        sleep 20 # the step-1000 checkpoint is written right after its log line
        kill "$pid" 2>/dev/null || true
        wait "$pid" || true
    fi
    [ -f "$run/vae1000.ckpt" ] || cp "$run/vae.ckpt" "$run/vae1000.ckpt"
    "$py" benchmarks/latent_probe.py "$run/vae1000.ckpt" --only separation gain --threads 1 |
        tee "$runs/S$seed.probe.txt"
    ;;
vae)
    vae
    "$py" -m mochi.train.tiny decoder --out "$run" --threads 1
    ;;
dit)
    until reached 1000; do sleep 60; done
    sleep 30
    "$py" -m mochi.train.tiny dit --out "$run" --preset mochi-tiny-d8 --threads 1
    "$py" -m mochi.train.tiny dit --out "$run" --preset mochi-tiny-d8 --threads 1 \
        --tune-steps 6000 --tune-lr 2e-4 --word-dropout 0.1 --tune-clips 2000 --word-consistency 1
    until [ -f "$run/decoder.ckpt" ] && grep -q "decoder step \([0-9]*\)/\1 " "$run/decoder.log"; do sleep 60; done
    "$py" -m mochi.train.tiny export --out "$run" --preset mochi-tiny-d8 --bundle "$run/S${seed}D8.safetensors"
    ;;
rate-vae)
    "$py" benchmarks/vae_quality.py "$run/decoder.ckpt" --source "$run/vae.ckpt" --threads 1 |
        tee "$runs/S$seed.vae_quality.txt"
    "$py" benchmarks/latent_probe.py "$run/decoder.ckpt" --source "$run/vae.ckpt" \
        --only ceiling separation gain --threads 1 | tee "$runs/S$seed.ceiling.txt"
    ;;
rate-dit)
    for first in 0 4; do
        "$py" benchmarks/adherence.py --model "$run/S${seed}D8.safetensors" --repeats 4 --seed $first \
            --threads 1 --no-vae --verbose >"$runs/S$seed.adherence$first.txt" 2>&1 &
    done
    wait
    tail -n 12 "$runs/S$seed.adherence0.txt" "$runs/S$seed.adherence4.txt"
    ;;
esac
