#!/usr/bin/env bash
# The GPU checks, most valuable first, one process per check with its own time limit, so that a
# failing or hanging check does not stop the others. Each check's results (its JSON and output)
# are copied to the folder that survives the call as soon as that check ends: a call cut short
# keeps every check that finished. Ends with one PASS/FAIL/SKIP line per check.
#
#   bash tools/gpu_checks.sh BUDGET_S [OUT_DIR] [CHECK...]     (from the repository root)
#
# BUDGET_S: the seconds this call may spend on all checks together (staged DALI install included),
#   set by the caller from the time it really has (a device call's limit, less what it spends
#   outside this script); GPU_CHECKS_BUDGET_S is read when the argument is absent. Each check's
#   limit is its weight's share of what is left when it starts, so the limits add up to the
#   budget and time a check does not use goes to the ones after it.
# OUT_DIR: where the checks write (default gpu-checks). When $OUT is set (a device call's folder
#   that comes back: at most 8 files), OUT_DIR is packed into $OUT/gpu-checks.tar.gz (replaced
#   whole, never half-written) and its summary copied to $OUT/summary.txt after each check.
# CHECK: only these (G0 G1 G4 G5 G3 G8 G6 G2 G7), in the order below.
#
# Order (value first): G0 environment, G1 graph-correctness tests, G4 end-to-end table, G5 phase
# switch, G3 hot loop, G8 captured DDP, G6 decode parity, then DALI: G2 buffer lifetime, G7 capture
# beside DALI. What each does: benchmarks/gpu_checks.py. Without DALI, G2 and G7 print SKIP; no
# network needed; staged wheels (tools/gpu_stage.sh) are installed first when they are here.
set -uo pipefail
budget_s="${1:-${GPU_CHECKS_BUDGET_S:-}}"
if ! [[ "$budget_s" =~ ^[0-9]+$ ]]; then
    echo "usage: bash tools/gpu_checks.sh BUDGET_S [OUT_DIR] [CHECK...]  (BUDGET_S: seconds for all checks, or set GPU_CHECKS_BUDGET_S)" >&2
    exit 2
fi
shift || true
out="${1:-gpu-checks}"
shift || true
wanted=("$@")
deadline=$((SECONDS + budget_s))
keep="${OUT:-}"
mkdir -p "$out" ${keep:+"$keep"}
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# id, weight (share of the budget), subcommand of benchmarks.gpu_checks; value first
checks=(
    "G0 20 env"
    "G1 120 graph-tests"
    "G4 200 e2e"
    "G5 40 switch"
    "G3 80 hot-loop"
    "G8 60 ddp-graphs"
    "G6 40 decode"
    "G2 40 dali-lifetime"
    "G7 50 dali-capture"
)
selected=()
for entry in "${checks[@]}"; do
    read -r id _ _ <<< "$entry"
    if [[ ${#wanted[@]} -eq 0 || " ${wanted[*]} " == *" $id "* ]]; then
        selected+=("$entry")
    fi
done

save() {  # pack what the checks wrote so far into the folder that survives the call
    if [[ -n "$keep" ]]; then
        tar -czf "$keep/gpu-checks.partial" -C "$(dirname "$out")" "$(basename "$out")" &&
            mv -f "$keep/gpu-checks.partial" "$keep/gpu-checks.tar.gz"
        if [[ -f "$out/summary.txt" ]]; then cp "$out/summary.txt" "$keep/summary.txt"; fi
    fi
}

if [[ -d .gpu-stage ]]; then
    bash tools/gpu_stage.sh --unpack 2>&1 | tee "$out/stage.txt"
    save
fi

results=()
weight_left=0
for entry in "${selected[@]}"; do
    read -r _ weight _ <<< "$entry"
    weight_left=$((weight_left + weight))
done
for entry in "${selected[@]}"; do
    read -r id weight command <<< "$entry"
    left=$((deadline - SECONDS))
    limit=$((left * weight / weight_left))
    weight_left=$((weight_left - weight))
    if [[ $limit -lt 20 ]]; then
        line="RESULT $id FAIL not run: ${left}s of the ${budget_s}s budget left"
        echo "$line" | tee "$out/$id.txt"
        results+=("${line#RESULT }")
        save
        continue
    fi
    echo "=== $id (limit ${limit}s of ${left}s left): $py -m benchmarks.gpu_checks $command --out $out"
    start=$SECONDS
    timeout --kill-after=10 "$((limit - 10))" "$py" -m benchmarks.gpu_checks "$command" --out "$out" 2>&1 | tee "$out/$id.txt"
    rc=${PIPESTATUS[0]}
    line=$(grep -E "^RESULT $id (PASS|FAIL|SKIP)" "$out/$id.txt" | tail -n 1)
    if [[ -z "$line" ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then
            line="RESULT $id FAIL timed out after $((limit - 10))s"
        else
            line="RESULT $id FAIL exit code $rc without a verdict (see $id.txt)"
        fi
        echo "$line" >> "$out/$id.txt"
    fi
    results+=("${line#RESULT } [$((SECONDS - start)) s]")
    printf '%s\n' "${results[@]}" > "$out/summary.txt"
    save
done

echo "=== summary"
printf '%s\n' "${results[@]}" | tee "$out/summary.txt"
save
