#!/usr/bin/env python3
"""TLS certificates and SuperNode keys for a fedtune deployment (docs/deployment.md).

Writes into OUT (default ./certs, git-ignored), one folder per machine to copy there:

    ca.crt, ca.key           a local certificate authority: keep ca.key off the servers
    superlink/               for the SuperLink's machine (mounted at /certs):
      ca.crt                   the CA, for `flwr` clients on that machine
      superlink.crt, .key      its server certificate, signed by the CA, with SANs
                               DNS:superlink, DNS:localhost, IP:127.0.0.1 plus --san /
                               $FEDTUNE_CERT_SANS (comma separated names or IPs)
      authorized/NAME.pub      the SuperNode public keys the SuperLink accepts: the
                               compose `register` service registers each of them
    NAME/                    for SuperNode NAME's machine (mounted at /certs):
      ca.crt                   the CA that signed the SuperLink's certificate
      supernode.key, .pub      its ECDSA key pair in OpenSSH format, as
                               flower-supernode --auth-supernode-private-key and
                               `flwr supernode register` expect

Existing files are kept, so rerunning adds SuperNodes without breaking deployed
certificates; --force makes everything anew. Needs only `cryptography` (a dependency
of flwr), e.g. .venv/bin/python, or the image: see docs/deployment.md.

    python scripts/make_certs.py                       # CA, SuperLink, supernode-0, supernode-1
    python scripts/make_certs.py --nodes 3 --san fl.example.org,203.0.113.7
    python scripts/make_certs.py --key-only            # on a client machine: certs/supernode/
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


def make_node_key(folder: Path) -> Path:
    """An ECDSA P-384 pair in OpenSSH format: flwr 1.42 accepts NIST-curve EC keys only."""
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / "supernode.key"
    if not private.exists():
        key = ec.generate_private_key(ec.SECP384R1())
        _write_key(private, key, serialization.PrivateFormat.OpenSSH)
        _write_private_readable(private)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        (folder / "supernode.key.pub").write_bytes(public + f" {folder.name}\n".encode())
    return folder / "supernode.key.pub"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="certs", help="output folder (default: ./certs)")
    parser.add_argument("--nodes", type=int, default=2,
                        help="SuperNodes supernode-0..N-1 to make keys for and authorize (default: 2)")
    parser.add_argument("--san", default=os.environ.get("FEDTUNE_CERT_SANS", ""),
                        help="extra comma separated DNS names or IPs of the SuperLink, e.g. its "
                             "public name (default: $FEDTUNE_CERT_SANS)")
    parser.add_argument("--key-only", metavar="NAME", nargs="?", const="supernode",
                        help="only make the key pair OUT/NAME/supernode.key (on a client "
                             "machine; default NAME: supernode) and send its .pub to the "
                             "server operator")
    parser.add_argument("--unauthorized", metavar="NAME", action="append", default=[],
                        help="also make SuperNode NAME without authorizing its key (tests)")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    if args.key_only:
        public = make_node_key(out / args.key_only)
        print(f"{public}: send it to the server operator, who puts it in "
              "certs/superlink/authorized/; put the CA's ca.crt you get back next to it")
        return 0

    superlink, authorized = out / "superlink", out / "superlink" / "authorized"
    authorized.mkdir(parents=True, exist_ok=True)
    sans = list(DEFAULT_SANS) + [s.strip() for s in args.san.split(",") if s.strip()]
    if (out / "ca.crt").exists() and (out / "ca.key").exists():
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    else:
        ca_key, ca_cert = make_ca(out)
    if not (superlink / "superlink.crt").exists() or args.san:
        make_server_cert(superlink, ca_key, ca_cert, sans)
    names = [f"supernode-{i}" for i in range(args.nodes)]
    for name in names + args.unauthorized:
        public = make_node_key(out / name)
        shutil.copyfile(out / "ca.crt", out / name / "ca.crt")
        if name in names:
            shutil.copyfile(public, authorized / f"{name}.pub")
    shutil.copyfile(out / "ca.crt", superlink / "ca.crt")
    print(f"{out}: CA, SuperLink certificate for {', '.join(sans)}, "
          f"{len(names)} authorized SuperNode key(s) in {authorized}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
