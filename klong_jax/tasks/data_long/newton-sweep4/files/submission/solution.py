def newton_sqrt(k, iters):
  x = float(k)
  for _ in range(iters):
    x = (x + k / x) / 2
  return {'root': x, 'err': abs(x * x - k)}
