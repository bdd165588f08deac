#!/usr/bin/env bash
# Resident memory of one `sparsegrad train` run, sampled every second from /proc: does it grow
# over many steps when every batch has a different padded length? Prints
# `seconds,step,rss_mib,hwm_mib` rows and a summary (peak within the first and the last
# quarter of the run).
#   scripts/rss_over_steps.sh OUT.csv sparsegrad train --model … --max-steps 200 …
set -euo pipefail
out=$1
shift
log=$(mktemp)
"$@" >"$log" 2>&1 &
pid=$!
echo "seconds,step,rss_mib,hwm_mib" >"$out"
t=0
while kill -0 "$pid" 2>/dev/null; do
  if [[ -r /proc/$pid/status ]]; then
    rss=$(awk '/^VmRSS/ {print int($2/1024)}' "/proc/$pid/status" 2>/dev/null || true)
    hwm=$(awk '/^VmHWM/ {print int($2/1024)}' "/proc/$pid/status" 2>/dev/null || true)
    step=$(grep -o 'step [0-9]*' "$log" | tail -1 | cut -d' ' -f2 || true)
    [[ -n $rss ]] && echo "$t,${step:-0},$rss,$hwm" >>"$out"
  fi
  sleep 1
  t=$((t + 1))
done
wait "$pid" || { tail -20 "$log"; exit 1; }
tail -3 "$log"
awk -F, 'NR > 1 && $2 > 0 { s[NR] = $2; r[NR] = $3; last = $2 }
  END {
    q = last / 4
    for (i in s) {
      if (s[i] <= q && r[i] > a) a = r[i]
      if (s[i] > 3 * q && r[i] > b) b = r[i]
    }
    printf "steps %d: peak RSS %d MiB in the first quarter, %d MiB in the last\n", last, a, b
  }' "$out"
