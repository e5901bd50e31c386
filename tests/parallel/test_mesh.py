"""Mesh construction from config: shapes, -1 fill, and errors that name the axis."""

import jax
import pytest

from klong_jax.parallel.mesh import MESH_AXES, MeshError, make_mesh, mesh_shape


def test_make_mesh_axes_and_fill():
  mesh = make_mesh({"data": 2, "expert": -1})
  assert mesh.axis_names == MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1,
                              "context": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(make_mesh().shape)["fsdp"] == len(jax.devices())


@pytest.mark.parametrize("sizes,axis", [
    ({"data": 3, "fsdp": -1}, "fsdp"),
    ({"tensor": 3}, "tensor"),
    ({"expert": 0}, "expert"),
    ({"pipeline": 2}, "pipeline"),
])
def test_bad_mesh_names_axis(sizes, axis):
  with pytest.raises(MeshError, match=repr(axis)):
    mesh_shape(sizes, 8)


def test_two_fill_axes_rejected():
  with pytest.raises(MeshError, match="at most one"):
    mesh_shape({"data": -1, "fsdp": -1}, 8)
