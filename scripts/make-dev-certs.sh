#!/usr/bin/env bash
# Generate DEVELOPMENT-ONLY TLS certificates and SuperNode authentication keys
# for a local Flower deployment (SuperLink + SuperNodes on localhost).
#
# Uses only openssl and POSIX tools (od, tr, printf); no ssh-keygen needed.
#
# Output (in OUT_DIR, default ./certs):
#   ca.key, ca.crt            self-signed CA (SuperLink --ssl-ca-certfile,
#                             SuperNode --root-certificates, flwr CLI root-certificates)
#   server.key, server.crt    SuperLink cert, SAN: localhost, 127.0.0.1, ::1
#                             (SuperLink --ssl-keyfile / --ssl-certfile)
#   supernode-<i>.key         SuperNode auth private key, OpenSSH format, ECDSA P-384
#                             (flower-supernode --auth-supernode-private-key)
#   supernode-<i>.pub         matching OpenSSH public key
#                             (flwr supernode register supernode-<i>.pub <connection>)
#   for i = 0 .. NUM_NODES-1 (same numbering as partition-id).
#
# Idempotent: existing files are kept; the server certificate is re-issued only if
# it is missing or no longer verifies against ca.crt. Use -f to regenerate all.

set -euo pipefail

usage() {
    echo "usage: $(basename "$0") [-n NUM_NODES] [-d DAYS] [-f] [OUT_DIR]" >&2
    echo "  -n NUM_NODES  SuperNode auth key pairs to create (default: 3)" >&2
    echo "  -d DAYS       certificate validity in days (default: 365)" >&2
    echo "  -f            overwrite existing files" >&2
    echo "  OUT_DIR       output folder (default: ./certs)" >&2
}

NUM_NODES=3
DAYS=365
FORCE=0
while getopts ":n:d:fh" opt; do
    case "$opt" in
        n) NUM_NODES="$OPTARG" ;;
        d) DAYS="$OPTARG" ;;
        f) FORCE=1 ;;
        h) usage; exit 0 ;;
        *) usage; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ "$#" -gt 1 ]; then usage; exit 2; fi
OUT_DIR="${1:-./certs}"

case "$NUM_NODES" in ''|*[!0-9]*) echo "error: NUM_NODES must be a non-negative integer" >&2; exit 2 ;; esac
case "$DAYS" in ''|*[!0-9]*|0) echo "error: DAYS must be a positive integer" >&2; exit 2 ;; esac
command -v openssl >/dev/null || { echo "error: openssl not found" >&2; exit 1; }

mkdir -p "$OUT_DIR"
cd "$OUT_DIR"
umask 077
TMP="$(mktemp -d ./.tmp.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT

need() {  # need FILE...: true if any file is missing or -f was given
    [ "$FORCE" = 1 ] && return 0
    local f
    for f in "$@"; do [ -s "$f" ] || return 0; done
    return 1
}

# ---------------------------------------------------------------- CA
ca_new=0
if need ca.key ca.crt; then
    cat > "$TMP/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:3072 -out ca.key 2>/dev/null
    openssl req -new -key ca.key -subj "/O=Flower dev/CN=Flower dev CA" -out "$TMP/ca.csr"
    openssl x509 -req -in "$TMP/ca.csr" -signkey ca.key -sha256 -days "$DAYS" \
        -extfile "$TMP/ca.ext" -out ca.crt 2>/dev/null
    ca_new=1
    echo "created $OUT_DIR/ca.key, $OUT_DIR/ca.crt"
fi
if [ "$(openssl pkey -in ca.key -pubout)" != "$(openssl x509 -in ca.crt -noout -pubkey)" ]; then
    echo "error: $OUT_DIR/ca.key does not match $OUT_DIR/ca.crt (rerun with -f)" >&2
    exit 1
fi

# ---------------------------------------------------------------- server
if [ "$ca_new" = 1 ] || need server.key server.crt \
    || ! openssl verify -CAfile ca.crt server.crt >/dev/null 2>&1; then
    cat > "$TMP/server.ext" <<'EOF'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
EOF
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key 2>/dev/null
    openssl req -new -key server.key -subj "/O=Flower dev/CN=localhost" -out "$TMP/server.csr"
    openssl x509 -req -in "$TMP/server.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
        -CAserial "$TMP/ca.srl" -sha256 -days "$DAYS" -extfile "$TMP/server.ext" \
        -out server.crt 2>/dev/null
    openssl verify -CAfile ca.crt server.crt >/dev/null
    echo "created $OUT_DIR/server.key, $OUT_DIR/server.crt"
fi
chmod 644 ca.crt server.crt

# ------------------------------------------------- SuperNode auth keys (OpenSSH)
hex() { od -An -v -tx1 | tr -d ' \n'; }                 # stdin bytes -> hex
bin() { printf "$(printf '%s' "$1" | sed 's/../\\x&/g')"; }  # hex arg -> bytes
u32() { printf '%08x' "$1"; }
sshstr() { printf '%s%s' "$(u32 $((${#1} / 2)))" "$1"; }  # SSH string of hex data
ascii() { printf '%s' "$1" | hex; }

make_node_key() {  # make_node_key NAME
    local name="$1" der d q mp keytype curve pub priv pad i n blob
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out "$TMP/$name.pem" 2>/dev/null
    # SEC1 DER of a P-384 key: 3081a4 020101 0430 <d:48> a007 06052b81040022 a164 036200 04<X,Y:96>
    der="$(openssl ec -in "$TMP/$name.pem" -outform DER -conv_form uncompressed 2>/dev/null | hex)"
    if [ "${#der}" -ne 334 ] || [ "${der:0:16}" != "3081a40201010430" ] \
        || [ "${der:112:28}" != "a00706052b81040022a164036200" ] || [ "${der:140:2}" != "04" ]; then
        echo "error: unexpected EC key encoding from openssl" >&2; exit 1
    fi
    d="${der:16:96}"
    q="${der:140:194}"
    mp="$d"                                            # mpint: strip zeros, sign byte
    while [ "${mp:0:2}" = "00" ]; do mp="${mp:2}"; done
    case "${mp:0:1}" in [89a-f]) mp="00$mp" ;; esac
    keytype="$(ascii ecdsa-sha2-nistp384)"
    curve="$(ascii nistp384)"
    blob="$(sshstr "$keytype")$(sshstr "$curve")$(sshstr "$q")"
    n="$(openssl rand -hex 4)"
    priv="$n$n$(sshstr "$keytype")$(sshstr "$curve")$(sshstr "$q")$(sshstr "$mp")$(sshstr "$(ascii "$name")")"
    pad=""; i=1
    while [ $(( (${#priv} + ${#pad}) / 2 % 8 )) -ne 0 ]; do pad="$pad$(printf '%02x' "$i")"; i=$((i + 1)); done
    priv="$priv$pad"
    {
        echo "-----BEGIN OPENSSH PRIVATE KEY-----"
        bin "$(ascii openssh-key-v1)00$(sshstr "$(ascii none)")$(sshstr "$(ascii none)")$(sshstr "")$(u32 1)$(sshstr "$blob")$(sshstr "$priv")" \
            | openssl base64 -A | fold -w 70
        echo
        echo "-----END OPENSSH PRIVATE KEY-----"
    } > "$TMP/$name.key"
    printf 'ecdsa-sha2-nistp384 %s %s\n' "$(bin "$blob" | openssl base64 -A)" "$name" > "$TMP/$name.pub"
    mv "$TMP/$name.key" "$name.key"
    chmod 644 "$TMP/$name.pub"
    mv "$TMP/$name.pub" "$name.pub"
    echo "created $OUT_DIR/$name.key, $OUT_DIR/$name.pub"
}

for ((idx = 0; idx < NUM_NODES; idx++)); do
    if need "supernode-$idx.key" "supernode-$idx.pub"; then
        make_node_key "supernode-$idx"
    fi
done
