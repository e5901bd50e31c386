"""The real TPU compiler (libtpu, on this CPU host) on fwd+bwd of one attention call, v5p:2x2x1:
blockwise and splash hold no buffer with two dims >= T, and "auto" on a TPU mesh picks splash."""

from __future__ import annotations

import pytest

pytest.importorskip("libtpu")

from benchmarks import attention as bench  # noqa: E402

T = 2048


@pytest.fixture(scope="module")
def devices():
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1",
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  return topo.devices


@pytest.mark.slow
def test_tpu_compile_has_no_t_by_t_buffer(devices):
  ref = bench.tpu_compile("reference", T, devices)
  assert ref["has_t_by_t_buffer"]  # The check sees the reference's scores.
  for impl in ("blockwise", "splash"):
    row = bench.tpu_compile(impl, T, devices)
    assert row["compiled"] and not row["has_t_by_t_buffer"], row
    assert row["temp_bytes"] < ref["temp_bytes"] / 8, (row, ref["temp_bytes"])


@pytest.mark.slow
def test_auto_on_a_tpu_mesh_compiles_splash(devices):
  row = bench.tpu_compile_auto(T, devices)
  assert row["mosaic_custom_call"] and not row["has_t_by_t_buffer"], row
