def geom_series(a, r, n):
  t = [a * r ** i for i in range(n)]
  return {'total': sum(t), 'last': t[-1]}
