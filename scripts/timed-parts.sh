#!/usr/bin/env bash
# Runs the parts of `make test` in stages and prints each part's time at the end.
#
#   scripts/timed-parts.sh STAGE...
#
# A stage is one make target ("lint"), or lanes separated by "|" that run at
# the same time, each lane its targets one after another (a stage of several
# targets and no "|" is one lane):
#   "molecule-cluster | unit molecule-migrate molecule-package molecule-ssd_cache"
# On 2 cores the cluster scenario beside the three small ones takes the time of
# the cluster alone plus a little (measured: 1780 s for all four, against
# about 2600 s one after another): their hosts wait on each other's I/O and
# on the network as much as on the CPU.
#
# A one-target stage prints to the terminal; lanes write each part's output to
# $LOG_DIR/PART.log (interleaved output would be unreadable) and say when a
# part ends. The first stage that fails stops the run; what failed is printed
# at the end, with the failing tests and the end of that part's log.
set -uo pipefail

LOG_DIR=${LOG_DIR:-.cache/logs}
mkdir -p "$LOG_DIR"
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT

# run_part PART [LOGFILE]: make PART; record "PART SECONDS STATUS" in $RESULTS.
run_part() {
  local part=$1 log=${2:-} start status rc
  start=$(date +%s)
  if [ -n "$log" ]; then
    make --no-print-directory "$part" >"$log" 2>&1
    rc=$?
  else
    make --no-print-directory "$part" 2>&1 | tee "$LOG_DIR/$part.log"
    rc=${PIPESTATUS[0]}
  fi
  if [ "$rc" -eq 0 ]; then status=passed; else status=FAILED; fi
  printf '%s %d %s\n' "$part" $(($(date +%s) - start)) "$status" >>"$RESULTS"
  [ "$status" = passed ]
}

# run_lane PART...: the parts one after another, stopping at the first failure.
run_lane() {
  local part
  for part in "$@"; do
    echo "=== $part started ($(date +%H:%M:%S)), log: $LOG_DIR/$part.log"
    if run_part "$part" "$LOG_DIR/$part.log"; then
      echo "=== $part passed ($(date +%H:%M:%S))"
    else
      echo "=== $part FAILED ($(date +%H:%M:%S))"
      return 1
    fi
  done
}

total_start=$(date +%s)
failed=""
for stage in "$@"; do
  if [[ $stage != *"|"* && $stage != *" "* ]]; then
    echo "=== $stage"
    run_part "$stage" || failed=$stage
  else
    echo "=== at the same time: $stage"
    stage_start=$(date +%s)
    pids=()
    IFS='|' read -ra lanes <<<"$stage"
    for lane in "${lanes[@]}"; do
      # shellcheck disable=SC2086  # a lane is a list of targets
      run_lane $lane &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do
      wait "$pid" || failed=${failed:-$stage}
    done
    printf '%-22s %6d s  (wall time of the lanes together)\n' "lanes" \
      $(($(date +%s) - stage_start)) >>"$RESULTS.lanes"
  fi
  [ -n "$failed" ] && break
done

echo "=== time per part"
while read -r part seconds status; do
  printf '%-22s %6d s  %s\n' "$part" "$seconds" "$status"
done <"$RESULTS"
[ -f "$RESULTS.lanes" ] && cat "$RESULTS.lanes" && rm -f "$RESULTS.lanes"
printf '%-22s %6d s\n' total $(($(date +%s) - total_start))

if [ -n "$failed" ]; then
  while read -r part _ status; do
    [ "$status" = FAILED ] || continue
    # The last lines first and the failing tests last: a CI page that keeps
    # only the end of the output still names what failed.
    echo "--- last lines of $LOG_DIR/$part.log"
    sed 's/\x1b\[[0-9;]*m//g' "$LOG_DIR/$part.log" | tail -n 25
    echo "=== FAILED: $part (log: $LOG_DIR/$part.log); its failing tests:"
    # pytest's summary lines, molecule's and ansible's failures (colour codes
    # removed). molecule boxes and wraps pytest's output: "│ FAILED" alone on
    # a line, the test id on the next ones ("│   ", cut at any character),
    # joined back here.
    sed 's/\x1b\[[0-9;]*m//g' "$LOG_DIR/$part.log" | awk '
      /^ *│ (FAILED|ERROR)$/ { sub(/^ *│ /, ""); joined = $0 " "; want = 3; next }
      want > 0 && /^ *│   / {
        line = $0; sub(/^ *│   /, "", line); joined = joined line
        if (--want == 0) { print joined; joined = "" }
        next
      }
      want > 0 { print joined; joined = ""; want = 0 }
      /^(FAILED|ERROR) |[│ ]FAILED |[│ ]ERROR |fatal: \[|Error: / { print }
      END { if (joined != "") print joined }' | tail -n 12
  done <"$RESULTS"
  echo "=== FAILED: $failed (later stages not run)"
  exit 1
fi
