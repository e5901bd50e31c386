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
