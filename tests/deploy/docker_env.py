"""Docker for the deployment test: a running daemon (started here if need be, with
Debian's docker.io installed by apt if missing), a local Debian base image (nothing can
be pulled from a registry on the test machines), and the project image built on it."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.deploy.flower import ROOT

APT_PACKAGES = ("docker.io", "docker-compose", "debootstrap")
BASE_IMAGE = "local/debian:bookworm-py311"
# python3.11 matches the local torch wheel (cp311); wordnet-base saves an apt step.
DEBOOTSTRAP_INCLUDE = "python3,python3-venv,ca-certificates,wordnet-base"
TORCH_WHEELS = Path("/opt/wheels")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class DockerUnavailable(Exception):
    """Docker cannot run here: the test is skipped with this reason."""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune")) / "docker"


def _run(args: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def _docker_ok() -> bool:
    return shutil.which("docker") is not None and _run(["docker", "info"], timeout=30).returncode == 0


def install_packages() -> None:
    """docker.io, docker-compose and debootstrap from apt, as on a fresh Debian machine."""
    missing = [p for p, exe in zip(APT_PACKAGES, ("dockerd", "docker-compose", "debootstrap"))
               if shutil.which(exe) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise DockerUnavailable(f"{', '.join(missing)} missing and not root: cannot apt-get install")
    if shutil.which("apt-get") is None:
        raise DockerUnavailable(f"{', '.join(missing)} missing and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = _run(["apt-get", "update", "-qq"], env=env)
    install = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)
    if update.returncode or install.returncode:
        raise DockerUnavailable(f"apt-get install {' '.join(missing)} failed (no network?): "
                                f"{(install.stderr or update.stderr).strip().splitlines()[-1:]}")


class Daemon:
    """The Docker daemon: the running one, or one started here and stopped by stop()."""

    def __init__(self, log: Path):
        self.proc: subprocess.Popen | None = None
        if _docker_ok():
            return
        install_packages()
        if os.geteuid() != 0:
            raise DockerUnavailable("no running Docker daemon, and starting dockerd needs root")
        # Not the tests' TMPDIR (tests/conftest.py's scratch folder, removed at the end):
        # runc writes its exec files there, so a dockerd outliving a killed test session
        # failed every later `docker exec` and healthcheck ("runc-process...: no such
        # file or directory"). Unset, dockerd uses its own /var/lib/docker/tmp.
        env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "RAY_TMPDIR")}
        self.proc = subprocess.Popen(["dockerd"], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
        deadline = time.time() + 60
        while not _docker_ok():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise DockerUnavailable(f"dockerd did not start: {tail}")
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containers and containerd
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if _run(["docker", "compose", "version"], timeout=30).returncode == 0:
        return ["docker", "compose"]
    install_packages()
    return ["docker-compose"]


def _image_exists(tag: str) -> bool:
    return _run(["docker", "image", "inspect", tag], timeout=60).returncode == 0


def base_image(work: Path) -> str:
    """A Debian bookworm image with Python 3.11 from debootstrap, its root filesystem
    cached as a tarball in the fedtune cache so that reruns skip the download."""
    if _image_exists(BASE_IMAGE):
        return BASE_IMAGE
    tarball = cache_dir() / "bookworm-py311-rootfs.tar"
    if not tarball.exists():
        install_packages()
        rootfs = work / "rootfs"
        boot = _run(["debootstrap", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}",
                     "bookworm", str(rootfs), "http://deb.debian.org/debian"], timeout=900)
        if boot.returncode:
            raise DockerUnavailable(f"debootstrap failed (no network?): "
                                    f"{boot.stderr.strip().splitlines()[-1:]}")
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)  # the .debs
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
        shutil.rmtree(rootfs, ignore_errors=True)
    with open(tarball, "rb") as f:
        subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=f, check=True,
                       capture_output=True, timeout=600)
    return BASE_IMAGE


def _context_hash(context: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def build_image(repository: str, base: str, context: Path) -> str:
    """docker/Dockerfile on the local base, from a context of the project's files plus
    docker/extra/: the local CPU torch wheel and the host's CA bundle (HTTPS to the
    package index goes through a proxy that this bundle trusts). The tag is a hash of
    the context, so that a rerun on an unchanged tree reuses the image."""
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "requirements.lock"):
        shutil.copy(ROOT / name, context / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("common", "server", "client", "docker"):
        shutil.copytree(ROOT / name, context / name, ignore=ignore)
    extra = context / "docker" / "extra"
    for wheel in sorted(TORCH_WHEELS.glob("torch-2.1[0-3]*cp311*.whl"))[:1]:
        shutil.copy(wheel, extra / wheel.name)
    if HOST_CA_BUNDLE.exists():
        shutil.copy(HOST_CA_BUNDLE, extra / "ca-certificates.crt")
    tag = f"{repository}:{_context_hash(context)}"
    if _image_exists(tag):
        return tag
    build = _run(["docker", "build", "-f", "docker/Dockerfile", "-t", tag,
                  "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "WITH_BUILTIN_MODEL=0",
                  "."], cwd=context, timeout=1200)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    # Images of older trees (2.4 GB each) only fill the disk.
    old = _run(["docker", "images", repository, "--format", "{{.Repository}}:{{.Tag}}"], timeout=60)
    stale = [t for t in old.stdout.split() if t != tag]
    if stale:
        _run(["docker", "image", "rm", *stale], timeout=300)
    return tag
