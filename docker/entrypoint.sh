#!/bin/sh
# Writes the `flwr` CLI's connection "fedtune" to the SuperLink at $FEDTUNE_SUPERLINK
# (host:port) into $FLWR_HOME/config.toml, then runs the command. TLS is verified with
# $FEDTUNE_ROOT_CA (default /certs/ca.crt) unless FEDTUNE_INSECURE=1.
set -eu
if [ -n "${FEDTUNE_SUPERLINK:-}" ]; then
  mkdir -p "$FLWR_HOME"
  if [ "${FEDTUNE_INSECURE:-0}" = 1 ]; then
    tls="insecure = true"
  else
    tls="root-certificates = \"${FEDTUNE_ROOT_CA:-/certs/ca.crt}\""
  fi
  printf '[superlink]\ndefault = "fedtune"\n\n[superlink.fedtune]\naddress = "%s"\n%s\n' \
    "$FEDTUNE_SUPERLINK" "$tls" > "$FLWR_HOME/config.toml"
fi
exec "$@"
