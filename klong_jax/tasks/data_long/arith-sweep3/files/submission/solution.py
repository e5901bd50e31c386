def arith_series(a, d, n):
  t = [a + i * d for i in range(n)]
  return {'total': sum(t), 'last': t[-1]}
