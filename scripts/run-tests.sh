#!/usr/bin/env bash
# Runs the whole test suite: the TypeScript end-to-end tests (real server, real sandboxes), the
# agent's own tests and the Python SDK's tests. Prints one closing line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
# Every server a test starts reserves its disk volume on the host (fallocate): a modest size keeps
# the suite's disk use small (the servers' default is 8 GB).
export PODFLARE_DISK_VOLUME_MB="${PODFLARE_DISK_VOLUME_MB:-1024}"

passed=0
failed=0
status=0

run_node_tests() {
  local out
  out=$(mktemp)
  node --expose-gc --import tsx --test --test-concurrency=1 --test-reporter=spec "$@" 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  local p f
  p=$(grep -E '^ℹ pass [0-9]+' "$out" | tail -1 | awk '{print $3}')
  f=$(grep -E '^ℹ fail [0-9]+' "$out" | tail -1 | awk '{print $3}')
  passed=$((passed + ${p:-0}))
  failed=$((failed + ${f:-0}))
  [ "$rc" -eq 0 ] || status=1
  if [ "$rc" -ne 0 ] && [ "${f:-0}" -eq 0 ]; then failed=$((failed + 1)); fi
  rm -f "$out"
}

# run_py_tests DIR START: unittest discovery of START (relative to DIR), with DIR on PYTHONPATH.
run_py_tests() {
  local dir=$1 start=$2 out
  out=$(mktemp)
  (cd "$dir" && PYTHONPATH="$PWD" /usr/bin/python3 -m unittest discover -s "$start" -v) 2>&1 | tee "$out"
  local rc=${PIPESTATUS[0]}
  local total fails errors
  total=$(grep -E '^Ran [0-9]+ test' "$out" | tail -1 | awk '{print $2}')
  fails=$(grep -oE 'failures=[0-9]+' "$out" | tail -1 | cut -d= -f2)
  errors=$(grep -oE 'errors=[0-9]+' "$out" | tail -1 | cut -d= -f2)
  local bad=$(( ${fails:-0} + ${errors:-0} ))
  # A runner that crashed before running anything counts as a failure, never as silence.
  if [ "$rc" -ne 0 ] && [ "$bad" -eq 0 ]; then bad=1; fi
  passed=$((passed + ${total:-0} - bad))
  failed=$((failed + bad))
  [ "$rc" -eq 0 ] || status=1
  rm -f "$out"
}

if [ "$#" -gt 0 ]; then
  run_node_tests "$@"
else
  run_py_tests agent tests
  run_node_tests test/*.test.ts
  run_py_tests python tests
fi

echo
echo "tests: $passed passed, $failed failed"
exit $status
