def collatz_run(start):
  x, k, p = start, 0, start
  while x != 1:
    x = x // 2 if x % 2 == 0 else 3 * x + 1
    k += 1
    p = max(p, x)
  return {'steps': k, 'peak': p}
