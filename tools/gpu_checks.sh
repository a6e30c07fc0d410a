#!/usr/bin/env bash
# The GPU checks, correctness first, then timings: one process per check, each with its own time
# limit, so that a failing or hanging check does not stop the others. Ends with one PASS/FAIL/SKIP
# line per check. About 5 minutes on one H100 when all pass; never more than GPU_CHECKS_BUDGET_S
# (default 540 s) in all, so that it fits one 600 s device call.
#
#   bash tools/gpu_checks.sh [OUT_DIR] [CHECK...]     (from the repository root; CHECK: G0 G1 G8 G3 G4 G5 G6 G2 G7)
#
# Writes OUT_DIR/<check>.txt (its output) and OUT_DIR/<check>-*.json (its results); what each check
# does is in benchmarks/gpu_checks.py. Works without DALI (G2 and G7 then print SKIP) and without
# network; staged wheels (tools/gpu_stage.sh) are installed first when they are here.
set -uo pipefail
out="${1:-gpu-checks}"
shift || true
budget_s="${GPU_CHECKS_BUDGET_S:-540}"  # all checks together: a device call may run 600 s
deadline=$((SECONDS + budget_s))
wanted=("$@")
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -d .gpu-stage ]]; then
    bash tools/gpu_stage.sh --unpack 2>&1 | tee "$out/stage.txt"
fi

results=()
run_check() {  # ID LIMIT_S COMMAND...: run, keep its output, record its RESULT line (or why there is none)
    local id=$1 limit=$2
    shift 2
    if [[ ${#wanted[@]} -gt 0 && ! " ${wanted[*]} " =~ " $id " ]]; then
        return
    fi
    local left=$((deadline - SECONDS))
    if [[ $left -lt 15 ]]; then
        results+=("$id FAIL not run: the ${budget_s}s budget was spent")
        return
    fi
    [[ $limit -gt $left ]] && limit=$left
    echo "=== $id (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$out/$id.txt"
    local rc=${PIPESTATUS[0]}
    local line
    line=$(grep -E "^RESULT $id (PASS|FAIL|SKIP)" "$out/$id.txt" | tail -n 1)
    if [[ -z "$line" ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            line="RESULT $id FAIL timed out after ${limit}s"
        else
            line="RESULT $id FAIL exit code $rc without a verdict (see $out/$id.txt)"
        fi
    fi
    results+=("${line#RESULT } [$((SECONDS - start)) s]")
}

checks=(-m benchmarks.gpu_checks)
run_check G0 30 "$py" "${checks[@]}" env --out "$out"
run_check G1 150 "$py" "${checks[@]}" graph-tests --out "$out"
run_check G8 60 "$py" "${checks[@]}" ddp-graphs --out "$out"
run_check G3 100 "$py" "${checks[@]}" hot-loop --out "$out"
run_check G4 170 "$py" "${checks[@]}" e2e --out "$out"
run_check G5 45 "$py" "${checks[@]}" switch --out "$out"
run_check G6 45 "$py" "${checks[@]}" decode --out "$out"
run_check G2 30 "$py" "${checks[@]}" dali-lifetime --out "$out"
run_check G7 60 "$py" "${checks[@]}" dali-capture --out "$out"

echo "=== summary"
printf '%s\n' "${results[@]}" | tee "$out/summary.txt"
