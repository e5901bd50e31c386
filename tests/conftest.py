"""Test-wide setup: 8 fake CPU devices (before JAX is imported) and the docker requirement."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def docker_required() -> bool:
  """KLONG_REQUIRE_DOCKER=1 (set by .ci/run) turns missing-docker skips into failures."""
  return os.environ.get("KLONG_REQUIRE_DOCKER", "") not in ("", "0")


def skip_or_fail(reason: str) -> None:
  if docker_required():
    pytest.fail(f"{reason} (KLONG_REQUIRE_DOCKER=1: sandbox tests must not skip)")
  pytest.skip(reason)


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
