#!/bin/sh
# Entrypoint of the Pilot image (installed as /usr/local/bin/pilot-entrypoint).
#
# Starts as root, prepares, then runs the command as the unprivileged user
# `pilot` (like the official redis/postgres images do):
#   1. makes $PILOT_BASE_DIR and its locks/ dir, owned by pilot;
#   2. copies the TLS files mounted read-only at $PILOT_CERTS_SRC (/certs) to
#      $PILOT_CERTS_DIR (/run/pilot/certs), owned by pilot, keys 0400 -- the
#      host's files stay 0600 and owned by whoever ran certs.sh;
#   3. PILOT_CLAIM_GPU=1 (trainers): takes the first visible GPU no other
#      container on this host holds (an flock on locks/gpu-<uuid>.lock, held
#      for the container's life) and sets CUDA_VISIBLE_DEVICES to it. Docker
#      gives every replica of `--scale trainer=N` the same GPU when each asks
#      for `count: 1`; with TRAINER_GPUS=all each replica sees all GPUs and
#      this claim spreads them, one GPU per replica. A replica that finds no
#      free GPU exits with an error instead of sharing one;
#   4. PILOT_SUPERNODE_KEYS=DIR (TLS trainers): takes a free SuperNode key
#      (DIR/*.key, same kind of lock) and sets PILOT_SUPERNODE_KEY to it: a
#      Flower node identity must not be shared by two SuperNodes;
#   5. sets PILOT_TRAINER_ID when unset: the SuperNode key's name, else
#      <PILOT_NODE_NAME or hostname>-<GPU uuid prefix>, else the hostname --
#      stable across container restarts, so a trainer finds its work dir again.
# Then: exec the command (setpriv to pilot when started as root).
set -eu

log() { echo "pilot-entrypoint: $*" >&2; }
die() { log "error: $*"; exit 1; }

RUN_USER="${PILOT_RUN_USER:-pilot}"
BASE="${PILOT_BASE_DIR:-/data/pilot}"
CERTS_SRC="${PILOT_CERTS_SRC:-/certs}"
CERTS_DIR="${PILOT_CERTS_DIR:-/run/pilot/certs}"
LOCK_DIR="${PILOT_LOCK_DIR:-$BASE/locks}"

is_root() { [ "$(id -u)" = 0 ]; }
can_drop() { is_root && id "$RUN_USER" >/dev/null 2>&1; }

# 1. writable dirs -------------------------------------------------------------------
mkdir -p "$BASE" "$LOCK_DIR"
if can_drop; then chown "$RUN_USER:" "$BASE" "$LOCK_DIR"; fi

# 2. TLS files -----------------------------------------------------------------------
if [ -d "$CERTS_SRC" ] && [ -n "$(ls -A "$CERTS_SRC" 2>/dev/null)" ]; then
  rm -rf "$CERTS_DIR"
  mkdir -p "$CERTS_DIR"
  cp -RL "$CERTS_SRC/." "$CERTS_DIR/"
  find "$CERTS_DIR" -type d -exec chmod 0700 {} +
  find "$CERTS_DIR" -type f -exec chmod 0444 {} +
  find "$CERTS_DIR" -type f -name '*.key' -exec chmod 0400 {} +
  if can_drop; then chown -R "$RUN_USER:" "$CERTS_DIR"; fi
fi

# 3. one GPU per trainer ------------------------------------------------------------------
PILOT_GPU=""
if [ "${PILOT_CLAIM_GPU:-0}" = 1 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    log "PILOT_CLAIM_GPU=1 but nvidia-smi is not available: no GPU claimed"
  else
    uuids="$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null)" \
      || die "nvidia-smi failed: does this container reserve a GPU (deploy.resources.reservations.devices)?"
    [ -n "$uuids" ] || die "PILOT_CLAIM_GPU=1 but no GPU is visible"
    seen=0
    for uuid in $uuids; do
      seen=$((seen + 1))
      exec 7>"$LOCK_DIR/gpu-$uuid.lock"
      if flock -n 7; then
        PILOT_GPU="$uuid"
        break
      fi
      exec 7>&-
    done
    [ -n "$PILOT_GPU" ] || die "all $seen visible GPU(s) are held by other containers on this host (locks in $LOCK_DIR). One GPU per trainer: with --scale trainer=N on a multi-GPU host set TRAINER_GPUS=all, so each replica sees every GPU and takes a free one"
    export CUDA_VISIBLE_DEVICES="$PILOT_GPU"
    log "claimed GPU $PILOT_GPU"
  fi
fi

# 4. one SuperNode key per trainer -------------------------------------------------------
KEY_NAME=""
if [ -n "${PILOT_SUPERNODE_KEYS:-}" ]; then
  [ -d "$PILOT_SUPERNODE_KEYS" ] || die "PILOT_SUPERNODE_KEYS=$PILOT_SUPERNODE_KEYS is not a directory (mount deploy/certs/supernode there)"
  total=0
  for key in "$PILOT_SUPERNODE_KEYS"/*.key; do
    [ -e "$key" ] || break
    total=$((total + 1))
    name="$(basename "$key" .key)"
    exec 8>"$LOCK_DIR/supernode-$name.lock"
    if flock -n 8; then
      KEY_NAME="$name"
      export PILOT_SUPERNODE_KEY="$key"
      break
    fi
    exec 8>&-
  done
  [ "$total" -gt 0 ] || die "no SuperNode keys (*.key) in $PILOT_SUPERNODE_KEYS: make them with deploy/certs.sh --supernodes N"
  [ -n "$KEY_NAME" ] || die "all $total SuperNode key(s) in $PILOT_SUPERNODE_KEYS are in use by other trainers on this host: make more with deploy/certs.sh --node-name NAME --supernodes N, and register them"
  log "using SuperNode key $KEY_NAME"
fi

# 5. trainer identity -------------------------------------------------------------------------
if [ -z "${PILOT_TRAINER_ID:-}" ]; then
  if [ -n "$KEY_NAME" ]; then
    PILOT_TRAINER_ID="$KEY_NAME"
  elif [ -n "$PILOT_GPU" ]; then
    PILOT_TRAINER_ID="${PILOT_NODE_NAME:-$(hostname)}-$(echo "$PILOT_GPU" | sed -e 's/^GPU-//' | cut -c1-8)"
  else
    PILOT_TRAINER_ID="$(hostname)"
  fi
fi
export PILOT_TRAINER_ID

[ $# -gt 0 ] || set -- pilot --help
if can_drop; then
  exec setpriv --reuid="$(id -u "$RUN_USER")" --regid="$(id -g "$RUN_USER")" --init-groups -- "$@"
fi
exec "$@"
