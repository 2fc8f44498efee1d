#!/bin/sh
# Starts flower-superlink with the given flags and, when they include
# --enable-supernode-auth, registers every SuperNode public key in $FEDTUNE_AUTHORIZED
# (default /certs/authorized) through the SuperLink's own Control API: the SuperLink
# then accepts exactly the listed keys. (flwr 1.42 dropped --auth-list-public-keys for
# `flwr supernode register`; this keeps the list a folder of files.) It touches
# /tmp/superlink-ready when done, which the compose healthcheck waits for, so the
# SuperNodes start only after their keys are registered.
set -eu
rm -f /tmp/superlink-ready
flower-superlink "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
port=8000
for arg in "$@"; do case "$arg" in --port=*) port=${arg#--port=} ;; esac; done
case " $* " in
  *" --enable-supernode-auth "*)
    i=0
    until python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 2)" 2>/dev/null; do
      i=$((i + 1)); [ "$i" -lt 120 ] || { echo "superlink.sh: the SuperLink did not open port $port" >&2; exit 1; }
      kill -0 "$pid" 2>/dev/null || { wait "$pid"; exit $?; }
      sleep 1
    done
    # The certificate names localhost and 127.0.0.1 (scripts/make_certs.py).
    FEDTUNE_SUPERLINK=127.0.0.1:$port entrypoint.sh \
      register-supernodes.sh "${FEDTUNE_AUTHORIZED:-/certs/authorized}" fedtune \
      || { kill -TERM "$pid"; exit 1; }
    ;;
esac
touch /tmp/superlink-ready
wait "$pid"
