#!/usr/bin/env bash
# A built checkout of an earlier commit, for `npm run bench -- --only paired --baseline DIR`:
# prints DIR. The checkout is a git worktree under ${TMPDIR:-/tmp}, with this tree's npm
# dependencies copied in (workspace links are relative, so they point into the checkout) and its
# TypeScript built. Idempotent: an existing checkout of the same commit is reused.
#
#   bash scripts/bench-baseline.sh <rev>        (default: HEAD~1)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rev="$(git rev-parse --verify "${1:-HEAD~1}^{commit}")"
dir="${TMPDIR:-/tmp}/pf-baseline-${rev:0:12}"
say() { printf 'bench-baseline: %s\n' "$*" >&2; }
if [ ! -f "$dir/.podflare-baseline-built" ]; then
  if [ ! -d "$dir" ]; then
    say "checking out ${rev:0:12} in $dir"
    git worktree add --detach -q "$dir" "$rev"
  fi
  if [ ! -d "$dir/node_modules" ]; then
    [ -d node_modules ] || { say "run scripts/setup.sh first (no node_modules here)"; exit 1; }
    cp -a node_modules "$dir/"
  fi
  say "building ${rev:0:12}"
  (cd "$dir" && npm run --silent build >&2)
  touch "$dir/.podflare-baseline-built"
fi
echo "$dir"
