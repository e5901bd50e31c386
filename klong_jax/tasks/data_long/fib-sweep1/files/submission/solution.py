def fib_mod(n, m):
  a, b, s = 0, 1, 0
  for _ in range(n + 1):
    s += a
    a, b = b, (a + b) % m
  return {'fn': (b - a) % m, 'total': s}
