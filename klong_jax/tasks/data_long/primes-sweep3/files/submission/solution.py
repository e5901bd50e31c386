def prime_sieve(limit):
  s = [1] * limit
  s[0] = s[1] = 0
  for i in range(2, limit):
    if s[i]:
      for j in range(i * i, limit, i):
        s[j] = 0
  p = [i for i in range(limit) if s[i]]
  return {'count': len(p), 'largest': p[-1]}
