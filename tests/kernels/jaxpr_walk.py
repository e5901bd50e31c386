"""Walks a jaxpr for the kernel tests' "no [T, T] / [tokens, V] buffer" checks."""


def intermediate_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of every value any equation produces, sub-jaxprs (scan / loop bodies) included."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(o.aval.shape) for o in eqn.outvars if hasattr(o.aval, "shape")]
    for param in eqn.params.values():
      for sub in (param if isinstance(param, list | tuple) else [param]):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          shapes += intermediate_shapes(inner)
  return shapes
