#!/usr/bin/env bash
# Runs a command on a quiet machine while the long runs are paused (SIGSTOP / SIGCONT), and records the pause in
# results/long/pauses.jsonl (run, wall-clock start and end, each arm's last logged step), so that summarize.py can
# take the paused seconds out of the training times of the evaluations after it. From the repository root:
#   bash results/long/pause_for.sh RUN_DIR COMMAND...      e.g. runs/long/d8_s0 python results/bench.py ...
set -euo pipefail
run=$1; shift
pids=$(pgrep -f "train_cifar.py .*--out \S*runs/long/$(basename $run)( |$)")
last() { grep -s '"kind": "train"' "$run/$1/log.jsonl" | tail -1 | python -c "import sys, json; print(json.dumps(json.loads(sys.stdin.read() or '{\"step\": null}')['step']))"; }   # null: not started
start=$(date +%s.%N); kill -STOP $pids
"$@" || status=$?
end=$(date +%s.%N); kill -CONT $pids
echo "{\"run\": \"$(basename $run)\", \"start\": $start, \"end\": $end, \"seconds\": $(python -c "print($end - $start)"), \
\"last_logged_step\": {\"residual\": $(last residual), \"dar\": $(last dar)}}" >> results/long/pauses.jsonl
exit ${status:-0}
