def logistic_map(r, x0, n):
  x, t = x0, []
  for _ in range(n):
    x = r * x * (1 - x)
    t.append(x)
  return {'final': x, 'mean': sum(t) / n}
