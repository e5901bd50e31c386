def gd_quadratic(a, b, lr, steps):
  x = 0.0
  for _ in range(steps):
    x -= lr * 2 * a * (x - b)
  return {'x': x, 'loss': a * (x - b) ** 2}
