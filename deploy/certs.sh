#!/usr/bin/env bash
# Pilot's TLS and SuperNode-authentication material, made with openssl (and
# ssh-keygen for the SuperNode keys). Idempotent: a file that exists is kept
# (a server certificate that lacks a requested --host is reported, not
# replaced); --force makes everything again.
#
#   deploy/certs.sh [--out DIR] [--host NAME_OR_IP]... [--supernodes N]
#                   [--node-name NAME] [--days N] [--force]
#
# Writes into DIR (default: deploy/certs, which git ignores):
#   ca.key, ca.crt            the lab's own CA (ECDSA P-256, 10 years). ca.crt goes to
#                             every machine; keep ca.key on the head node (or offline).
#   superlink.{crt,key}       Flower SuperLink (Fleet + Control + Runtime API, one HTTPS port)
#   redis.{crt,key}           Redis TLS port
#   coordinator.{crt,key}     the coordinator's gRPC API (runs in the serverapp container)
#   tokenizer.{crt,key}       the tokenizer's gRPC service
#   evaluator.{crt,key}       the evaluator's gRPC API
#   supernode/NAME-I.key      SuperNode authentication keys (ECDSA P-384, OpenSSH
#   supernode/NAME-I.pub      format, which Flower 1.41 reads): one pair per trainer.
#                             Register each .pub with `flwr supernode register`.
# Every server certificate carries the SANs <service name> (its compose
# hostname), localhost, 127.0.0.1 and each --host (the head node's DNS name or
# IP, so workers and operators can reach it by that name). Private keys are
# 0600, the directories 0700.
#
# Add keys for another worker later (the CA and server certs are kept):
#   deploy/certs.sh --node-name gpu-box-2 --supernodes 4
set -euo pipefail
umask 077

SERVICES=(superlink redis coordinator tokenizer evaluator)
# extra compose hostnames per service (the coordinator lives in the serverapp container)
declare -A ALIASES=([coordinator]="serverapp")

out="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/certs"
hosts=()
supernodes=0
node_name="supernode"
days=825
ca_days=3650
force=0

die() { echo "certs.sh: $*" >&2; exit 2; }
say() { echo "certs.sh: $*"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --host) hosts+=("${2:?--host needs a name or IP}"); shift 2 ;;
    --supernodes) supernodes="${2:?--supernodes needs a count}"; shift 2 ;;
    --node-name) node_name="${2:?--node-name needs a name}"; shift 2 ;;
    --days) days="${2:?--days needs a number}"; shift 2 ;;
    --force) force=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$supernodes" =~ ^[0-9]+$ ]] || die "--supernodes must be a number, got '$supernodes'"
[[ "$days" =~ ^[0-9]+$ && "$days" -gt 0 ]] || die "--days must be a positive number, got '$days'"
[[ "$node_name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "--node-name '$node_name': use letters, digits, . _ -"
command -v openssl >/dev/null || die "openssl not found (apt-get install openssl)"

mkdir -p "$out"
chmod 700 "$out"

is_ip() { [[ "$1" =~ ^[0-9]+(\.[0-9]+){3}$ || "$1" == *:* ]]; }

# keep(path): true when path exists and must be kept (no --force)
keep() { [[ -e "$1" && $force -eq 0 ]]; }

# --- the CA -------------------------------------------------------------------
ca_key="$out/ca.key"
ca_crt="$out/ca.crt"
if keep "$ca_key" && keep "$ca_crt"; then
  say "keeping CA $ca_crt"
  ca_new=0
else
  if [[ $force -eq 0 && ( -e "$ca_key" || -e "$ca_crt" ) ]]; then
    die "only one of ca.key / ca.crt exists in $out; restore it, or re-run with --force to make a new CA (and new certificates)"
  fi
  for svc in "${SERVICES[@]}"; do
    if [[ $force -eq 0 && ( -e "$out/$svc.key" || -e "$out/$svc.crt" ) ]]; then
      die "$out has server certificates but no CA; restore ca.key/ca.crt, or re-run with --force to replace them all"
    fi
  done
  openssl req -x509 -new -nodes -sha256 -days "$ca_days" \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$ca_key" -out "$ca_crt" -subj "/O=Pilot/CN=Pilot CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  chmod 600 "$ca_key"; chmod 644 "$ca_crt"
  say "made CA $ca_crt"
  ca_new=1
fi

# --- server certificates ----------------------------------------------------------
sans_for() {  # sans_for SERVICE -> "DNS:x,DNS:y,IP:z"
  local svc="$1" list=() h
  list+=("DNS:$svc")
  [[ -n "${ALIASES[$svc]:-}" ]] && list+=("DNS:${ALIASES[$svc]}")
  list+=("DNS:localhost" "IP:127.0.0.1")
  for h in "${hosts[@]}"; do
    if is_ip "$h"; then list+=("IP:$h"); else list+=("DNS:$h"); fi
  done
  local IFS=,
  echo "${list[*]}"
}

missing_sans() {  # missing_sans CERT SANS -> the requested SANs the cert lacks
  local have want missing=()
  have="$(openssl x509 -in "$1" -noout -ext subjectAltName 2>/dev/null | tr -d ' ' | sed -e 's/IPAddress:/IP:/g')"
  IFS=, read -r -a want <<<"$2"
  for s in "${want[@]}"; do
    [[ ",$(echo "$have" | tr '\n' ',')," == *",$s,"* ]] || missing+=("$s")
  done
  echo "${missing[*]:-}"
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for svc in "${SERVICES[@]}"; do
  key="$out/$svc.key"; crt="$out/$svc.crt"; sans="$(sans_for "$svc")"
  if [[ $ca_new -eq 0 ]] && keep "$key" && keep "$crt"; then
    lacking="$(missing_sans "$crt" "$sans")"
    if [[ -n "$lacking" ]]; then
      say "WARNING: keeping $crt, but it lacks SAN(s) $lacking; re-run with --force to reissue"
    else
      say "keeping $crt"
    fi
    continue
  fi
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$key" -out "$tmp/$svc.csr" -subj "/O=Pilot/CN=$svc" 2>/dev/null
  cat >"$tmp/$svc.ext" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
EOF
  openssl x509 -req -sha256 -days "$days" -in "$tmp/$svc.csr" \
    -CA "$ca_crt" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$tmp/$svc.ext" -out "$crt" 2>/dev/null
  chmod 600 "$key"; chmod 644 "$crt"
  openssl verify -CAfile "$ca_crt" "$crt" >/dev/null || die "$crt does not verify against $ca_crt"
  say "made $crt ($sans)"
done

# --- SuperNode authentication keys ---------------------------------------------------
# Flower 1.41 reads SuperNode keys with cryptography's load_ssh_{private,public}_key:
# an EC key on a NIST curve in OpenSSH format, which openssl cannot write -- so ssh-keygen.
if [[ $supernodes -gt 0 ]]; then
  command -v ssh-keygen >/dev/null || die "ssh-keygen not found (apt-get install openssh-client): Flower's SuperNode keys are OpenSSH-format ECDSA keys"
  mkdir -p "$out/supernode"
  chmod 700 "$out/supernode"
  for ((i = 0; i < supernodes; i++)); do
    name="$node_name-$i"; key="$out/supernode/$name.key"; pub="$out/supernode/$name.pub"
    if keep "$key" && keep "$pub"; then
      say "keeping SuperNode key $key"
      continue
    fi
    if [[ $force -eq 0 && ( -e "$key" || -e "$pub" ) ]]; then
      die "only one of $name.key / $name.pub exists; remove it or use --force"
    fi
    rm -f "$tmp/k" "$tmp/k.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "pilot-$name" -f "$tmp/k"
    mv -f "$tmp/k" "$key"; mv -f "$tmp/k.pub" "$pub"
    chmod 600 "$key"; chmod 644 "$pub"
    say "made SuperNode key $key (register $pub with: flwr supernode register $pub <connection>)"
  done
fi
