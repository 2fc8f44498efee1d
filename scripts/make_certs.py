#!/usr/bin/env python3
"""TLS certificates and SuperNode keys for a fedtune deployment (docs/deployment.md).

Writes into OUT (default ./certs, git-ignored):

    ca.crt, ca.key                 a local certificate authority (keep ca.key private)
    superlink.crt, superlink.key   the SuperLink's server certificate, signed by the CA, with
                                   SANs DNS:superlink, DNS:localhost, IP:127.0.0.1 plus
                                   --san / $FEDTUNE_CERT_SANS (comma separated names or IPs)
    supernode-keys/NAME, NAME.pub  one ECDSA key pair per SuperNode, OpenSSH format, as
                                   flower-supernode --auth-supernode-private-key and
                                   flwr supernode register expect
    authorized/NAME.pub            the public keys the SuperLink accepts: the compose
                                   `register` service registers each of them

Existing files are kept, so rerunning adds keys without breaking deployed certificates;
--force makes everything anew. Needs only `cryptography` (a dependency of flwr).

    python scripts/make_certs.py                          # CA, server cert, supernode-0, supernode-1
    python scripts/make_certs.py --nodes 3 --san fl.example.org,203.0.113.7
    python scripts/make_certs.py --key-only alice         # on a client machine: its key pair only
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shutil
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("superlink", "localhost", "127.0.0.1")
VALID_DAYS = 825  # the longest validity clients accept for a server certificate


def _write_key(path: Path, key, fmt=serialization.PrivateFormat.PKCS8) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_private_readable(path: Path) -> None:
    # The containers run as a non-root user that is not the owner of the mounted files:
    # the key files are readable by all, and the folder they live in is the access control.
    path.chmod(0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def make_ca(out: Path):
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("fedtune local CA")).issuer_name(_name("fedtune local CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_key(out / "ca.key", key)
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def make_server_cert(out: Path, ca_key, ca_cert, sans: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(sans[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(out / "superlink.key", key)
    _write_private_readable(out / "superlink.key")
    (out / "superlink.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(keys: Path, name: str) -> Path:
    """An ECDSA P-384 pair in OpenSSH format: flwr 1.42 accepts NIST-curve EC keys only."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = keys / name
    _write_key(private, key, serialization.PrivateFormat.OpenSSH)
    _write_private_readable(private)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    (keys / f"{name}.pub").write_bytes(public + f" {name}\n".encode())
    return keys / f"{name}.pub"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="certs", help="output folder (default: ./certs)")
    parser.add_argument("--nodes", type=int, default=2,
                        help="SuperNode key pairs supernode-0..N-1 to make and authorize (default: 2)")
    parser.add_argument("--san", default=os.environ.get("FEDTUNE_CERT_SANS", ""),
                        help="extra comma separated DNS names or IPs of the SuperLink, e.g. its "
                             "public name (default: $FEDTUNE_CERT_SANS)")
    parser.add_argument("--key-only", metavar="NAME",
                        help="only make the key pair NAME (on a client machine); send NAME.pub "
                             "to the server operator")
    parser.add_argument("--unauthorized", metavar="NAME", action="append", default=[],
                        help="also make key pair NAME without authorizing it (for tests)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    keys, authorized = out / "supernode-keys", out / "authorized"
    keys.mkdir(parents=True, exist_ok=True)
    if args.key_only:
        if not (keys / args.key_only).exists():
            make_node_key(keys, args.key_only)
        print(f"key pair: {keys / args.key_only}; send {keys / args.key_only}.pub to the server operator")
        return 0

    authorized.mkdir(exist_ok=True)
    sans = list(DEFAULT_SANS) + [s.strip() for s in args.san.split(",") if s.strip()]
    if (out / "ca.crt").exists() and (out / "ca.key").exists():
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    else:
        ca_key, ca_cert = make_ca(out)
    if not (out / "superlink.crt").exists() or args.san:
        make_server_cert(out, ca_key, ca_cert, sans)
    for name in [f"supernode-{i}" for i in range(args.nodes)]:
        if not (keys / name).exists():
            make_node_key(keys, name)
        shutil.copyfile(keys / f"{name}.pub", authorized / f"{name}.pub")
    for name in args.unauthorized:
        if not (keys / name).exists():
            make_node_key(keys, name)
    print(f"{out}: CA, SuperLink certificate for {', '.join(sans)}, "
          f"{args.nodes} authorized SuperNode key(s) in {authorized}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
