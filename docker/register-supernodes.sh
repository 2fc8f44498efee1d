#!/bin/sh
# Register every SuperNode public key in DIR with the SuperLink of flwr connection CONN,
# through its Control API (flwr 1.42's node authentication: a SuperLink started with
# --enable-supernode-auth accepts only registered keys). Rerunning is safe: a key that
# is already registered (the SuperLink's --database keeps them) is skipped.
#   usage: register-supernodes.sh [DIR (default /certs/authorized)] [CONN (default fedtune)]
set -eu
dir=${1:-/certs/authorized}
conn=${2:-fedtune}
found=0
for key in "$dir"/*.pub; do
  [ -e "$key" ] || break
  found=1
  if out=$(flwr supernode register "$key" "$conn" 2>&1); then
    echo "registered $(basename "$key"): $(echo "$out" | tail -n 1)"
  else
    case "$out" in
      *"already in use"*) echo "registered $(basename "$key"): already" ;;
      *) echo "$out" >&2; echo "register-supernodes: cannot register $key" >&2; exit 1 ;;
    esac
  fi
done
if [ "$found" = 0 ]; then
  echo "register-supernodes: no *.pub key in $dir: run scripts/make_certs.py first" >&2
  exit 1
fi
