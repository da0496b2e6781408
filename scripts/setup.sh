#!/usr/bin/env bash
# Everything Podflare needs on this machine, idempotent: Debian packages, npm dependencies, the
# TypeScript build, and the sandbox image. Quiet when there is nothing to do; says what it installs.
#
#   bash scripts/setup.sh          what the server and the demo run on (`npm start`)
#   bash scripts/setup.sh --test   that, plus what only the tests and the bench use: Chromium (the
#                                  dashboard's browser tests), Jupyter (the bench's peer), numpy and
#                                  matplotlib on the host (the agent's own unit tests)
#
# Environment: PODFLARE_STATE_DIR (default /var/lib/podflare): the image goes to <state dir>/images
# (or PODFLARE_IMAGES_DIR).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
FOR_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --test) FOR_TESTS=1 ;;
    *) printf 'usage: bash scripts/setup.sh [--test]\n' >&2; exit 2 ;;
  esac
done
STATE_DIR="${PODFLARE_STATE_DIR:-/var/lib/podflare}"

SUDO=()
if [ "$(id -u)" != 0 ]; then
  SUDO=(sudo)
fi

say() { printf 'setup: %s\n' "$*" >&2; }

# (a) Debian packages ------------------------------------------------------------------------
PACKAGES=(
  bubblewrap mmdebstrap slirp4netns iproute2 uidmap python3-seccomp btrfs-progs
  qemu-system-x86 qemu-utils busybox-static lz4 e2fsprogs python3
)
if [ "$FOR_TESTS" = 1 ]; then
  PACKAGES+=(
    python3-numpy python3-matplotlib # the agent's unit tests run on the host's Python
    python3-jupyter-client python3-ipykernel # the bench's Jupyter peer
    chromium # the dashboard's end-to-end tests drive it through playwright-core
    postgresql nftables # the cluster tests: a throwaway PostgreSQL, partitions inside network namespaces
    patroni etcd-server # the database failover test: two PostgreSQL under Patroni, etcd its consensus store
  )
fi

# apt-get with one progress line instead of pages of "Unpacking …": its machine-readable status
# (APT::Status-Fd) drives the line; everything else goes to a log, shown only if apt fails.
apt_quietly() {
  local what=$1 log
  shift
  log="$(mktemp)"
  local last=-1 percent line
  if ! { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o APT::Status-Fd=3 "$@" 3>&1 >"$log" 2>&1; } |
    while IFS=: read -r kind _ percent line; do
      case "$kind" in dlstatus|pmstatus) ;; *) continue ;; esac
      percent="${percent%%.*}"
      [[ "$percent" =~ ^[0-9]+$ ]] || continue
      if [ -t 2 ]; then
        printf '\rsetup: %s: %3s%% %-50.50s' "$what" "$percent" "$line" >&2
      elif [ "$((percent / 25))" != "$last" ]; then # not a terminal: a line per quarter
        last=$((percent / 25))
        printf 'setup: %s: %s%% (%s)\n' "$what" "$percent" "$line" >&2
      fi
    done; then
    [ -t 2 ] && printf '\n' >&2
    say "apt-get failed; its output:"
    tail -n 40 "$log" >&2
    rm -f "$log"
    return 1
  fi
  [ -t 2 ] && printf '\rsetup: %s: done%-60s\n' "$what" "" >&2
  rm -f "$log"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [ "$status" != installed ]; then
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt_quietly "updating the package lists" update
  apt_quietly "installing" install -y --no-install-recommends "${missing[@]}"
fi

# (b) npm dependencies -----------------------------------------------------------------------
# Reinstalled when node_modules is missing or package-lock.json changed since the last `npm ci`.
STAMP=node_modules/.podflare-npm-ci.stamp
need_ci=0
if [ ! -d node_modules ]; then
  need_ci=1
elif [ -f "$STAMP" ]; then
  if [ package-lock.json -nt "$STAMP" ]; then need_ci=1; fi
elif [ -f node_modules/.package-lock.json ] && ! [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # Installed before this script kept a stamp, and npm's own record is current: adopt it.
  touch "$STAMP"
else
  need_ci=1
fi
if [ "$need_ci" = 1 ]; then
  say "installing npm dependencies (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error >&2
  touch "$STAMP"
fi
# better-sqlite3 is a native module: its install script compiles it (no prebuilt binary can be
# downloaded here). If that was skipped or built for another Node, build it now.
if ! node -e "require('better-sqlite3')" >/dev/null 2>&1; then
  say "building better-sqlite3's native module (npm rebuild better-sqlite3)"
  npm rebuild better-sqlite3 --loglevel=error >&2
  node -e "require('better-sqlite3')"
fi

# (c) TypeScript build (incremental: instant when nothing changed) ---------------------------
npm run --silent build
chmod +x packages/cli/dist/main.js packages/mcp/dist/main.js
# The bins of our own packages: npm links a workspace's bin only if it exists at install time, and
# these are built after it. `npx podflare …` in the repo runs node_modules/.bin/podflare.
ln -sfn ../@podflare/cli/dist/main.js node_modules/.bin/podflare
ln -sfn ../@podflare/mcp/dist/main.js node_modules/.bin/podflare-mcp

# (d) the sandbox image (instant when current; about a minute the first time) ----------------
# mmdebstrap --mode=root needs root. sudo resets PATH and the environment: pass node's full path
# and the variables that choose the directories.
image_env=()
for var in PODFLARE_IMAGES_DIR PODFLARE_AGENT_DIR; do
  if [ -n "${!var:-}" ]; then image_env+=("$var=${!var}"); fi
done
"${SUDO[@]}" env "${image_env[@]}" "$(command -v node)" packages/cli/dist/main.js image build --quiet --state-dir "$STATE_DIR"

# (d2) tests only: the python-datasci template (a layer over the image: scipy, scikit-learn…; a few
# minutes the first time, instant after). `npm start` does not build it: a server builds it on the
# first sandbox that asks for it.
if [ "$FOR_TESTS" = 1 ]; then
  "${SUDO[@]}" env "${image_env[@]}" "$(command -v node)" packages/cli/dist/main.js template build python-datasci --quiet --state-dir "$STATE_DIR"
fi

# (e) the microVM guest (kernel from Debian's cloud kernel package, initramfs, ext4 root; seconds).
# Optional for the namespace runtime: a failure here is reported, not fatal.
if ! "${SUDO[@]}" env "${image_env[@]}" "$(command -v node)" packages/cli/dist/main.js image build --runtime vm --quiet --state-dir "$STATE_DIR"; then
  say "the VM guest image could not be built: the vm runtime will try again on first use"
fi
