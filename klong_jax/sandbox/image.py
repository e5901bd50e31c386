"""Offline sandbox image build: debootstrap a Debian base, `docker import` it, layer the runner.

There is no registry here, so the base root filesystem comes from `debootstrap --variant=minbase`
against the Debian mirror named in apt's sources. Both layers are tagged by a content hash of their
definition in `sandbox/`, so `--ensure` is a no-op when nothing changed.

  python -m klong_jax.sandbox.image --ensure      # build if missing, print the tag
  python -m klong_jax.sandbox.image --print_tag   # the tag the current sandbox/ defines
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags, logging

REPO = "klong-sandbox"
BASE_REPO = "klong-sandbox-base"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
LABEL = "klong.sandbox"


class ImageError(RuntimeError):
  """The sandbox image could not be built or found; the message says what to do."""


def sandbox_dir() -> Path:
  """The image definition folder (repo `sandbox/`), overridable with $KLONG_SANDBOX_DIR."""
  env = os.environ.get("KLONG_SANDBOX_DIR")
  path = Path(env) if env else Path(__file__).resolve().parents[2] / "sandbox"
  if not (path / "Dockerfile").is_file():
    raise ImageError(f"sandbox definition not found at {path} (expected Dockerfile, packages.txt, "
                     "runner.py); set KLONG_SANDBOX_DIR to the repo's sandbox/ folder")
  return path


def runner_path() -> Path:
  """Path of the in-container runner script (also used on the host by the local backend)."""
  return sandbox_dir() / "runner.py"


def packages() -> list[str]:
  """Debian packages for the base, from sandbox/packages.txt."""
  lines = (sandbox_dir() / "packages.txt").read_text().splitlines()
  return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def debian_mirror() -> str:
  """The first Debian (non-security) mirror URI in the machine's apt sources."""
  for src in _SOURCES:
    try:
      text = Path(src).read_text()
    except OSError:
      continue
    for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(
        r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", text, re.M):
      if "security" not in uri:
        return uri
  return DEFAULT_MIRROR


def _digest(parts: list[bytes]) -> str:
  h = hashlib.sha256()
  for p in parts:
    h.update(len(p).to_bytes(8, "little"))
    h.update(p)
  return h.hexdigest()[:16]


def base_tag() -> str:
  """Content tag of the debootstrapped base (packages + suite + variant; not the mirror URL)."""
  spec = "\n".join([SUITE, "minbase", *packages()]).encode()
  return f"{BASE_REPO}:{_digest([spec])}"


def image_tag() -> str:
  """Content tag of the final sandbox image: the base tag plus Dockerfile and runner."""
  d = sandbox_dir()
  parts = [base_tag().encode(), (d / "Dockerfile").read_bytes(), (d / "runner.py").read_bytes()]
  return f"{REPO}:{_digest(parts)}"


def _client():
  import docker  # Imported lazily: `--print_tag` works without a docker engine.
  try:
    client = docker.from_env()
    client.ping()
  except Exception as e:  # noqa: BLE001 - any failure means "no usable engine".
    raise ImageError(f"no docker engine reachable ({e}); start dockerd or use backend='local'"
                     ) from e
  return client


def image_exists(tag: str | None = None) -> bool:
  """True if the sandbox image (default: current content tag) is present locally."""
  import docker
  try:
    _client().images.get(tag or image_tag())
    return True
  except docker.errors.ImageNotFound:
    return False


def _debootstrap(rootfs: Path) -> None:
  if shutil.which("debootstrap") is None:
    if os.geteuid() == 0 and shutil.which("apt-get"):
      logging.info("installing debootstrap with apt-get")
      subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], check=True,
                     stdout=subprocess.DEVNULL)
    else:
      raise ImageError("debootstrap is missing; run: sudo apt-get install -y debootstrap")
  cmd = ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages()), SUITE,
         str(rootfs), debian_mirror()]
  if os.geteuid() != 0:
    raise ImageError("building the sandbox base needs root for debootstrap; run as root:\n  "
                     + " ".join(cmd))
  logging.info("running: %s", " ".join(cmd))
  res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  if res.returncode != 0:
    raise ImageError(f"debootstrap failed (exit {res.returncode}):\n{res.stdout[-3000:]}")
  for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
    for p in (rootfs / junk).glob("*"):
      if p.is_file():
        p.unlink()


def build_base(client) -> str:
  """Debootstraps and imports the base image if its tag is missing; returns the tag."""
  import docker
  tag = base_tag()
  try:
    client.images.get(tag)
    return tag
  except docker.errors.ImageNotFound:
    pass
  with tempfile.TemporaryDirectory(prefix="klong-rootfs-") as tmp:
    rootfs, tarball = Path(tmp) / "rootfs", Path(tmp) / "rootfs.tar"
    t0 = time.time()
    _debootstrap(rootfs)
    logging.info("debootstrap took %.1fs", time.time() - t0)
    subprocess.run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."],
                   check=True)
    repo, tg = tag.split(":")
    client.api.import_image_from_file(str(tarball), repository=repo, tag=tg)
  client.images.get(tag)  # Raises if the import did not produce the tag.
  return tag


def build_image(client) -> str:
  """Builds the final layer (user, workspace, runner) on the base; returns the tag."""
  base = build_base(client)
  tag = image_tag()
  d = sandbox_dir()
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name in ("Dockerfile", "runner.py"):
      tar.add(str(d / name), arcname=name)
  buf.seek(0)
  try:
    client.images.build(fileobj=buf, custom_context=True, tag=tag, buildargs={"BASE": base},
                        labels={LABEL: "1"}, rm=True, forcerm=True, network_mode="none")
  except Exception as e:  # docker.errors.BuildError carries the log.
    log = "".join(str(x.get("stream", "")) for x in getattr(e, "build_log", []) or [])
    raise ImageError(f"docker build of {tag} failed: {e}\n{log[-3000:]}") from e
  return tag


def ensure_image() -> str:
  """Returns the sandbox image tag, building it first if missing (cached by content hash)."""
  client = _client()
  tag = image_tag()
  if image_exists(tag):
    return tag
  # One build per host: concurrent callers (pytest-xdist workers, demo + tests) wait on a lock
  # and then find the image built.
  lock_path = os.path.join(tempfile.gettempdir(), "klong-sandbox-build.lock")
  with open(lock_path, "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if image_exists(tag):
      return tag
    t0 = time.time()
    build_image(client)
    logging.info("built %s in %.1fs", tag, time.time() - t0)
  return tag


_ENSURE: Any = None
_PRINT: Any = None


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so that importing this
  module next to other entry points never clashes on flag names)."""
  global _ENSURE, _PRINT
  _ENSURE = flags.DEFINE_bool("ensure", False, "Build the image if missing, then print its tag.")
  _PRINT = flags.DEFINE_bool("print_tag", False, "Print the content tag and exit.")


def main(argv: list[str]) -> None:
  del argv
  if _PRINT.value and not _ENSURE.value:
    print(image_tag())
    return
  if not _ENSURE.value:
    raise app.UsageError("pass --ensure (build if missing) or --print_tag")
  t0 = time.time()
  try:
    tag = ensure_image()
  except ImageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{tag} ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
