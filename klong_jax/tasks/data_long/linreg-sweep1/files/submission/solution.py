def linreg_fit(xs, ys):
  n = len(xs)
  mx, my = sum(xs) / n, sum(ys) / n
  sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
  sxx = sum((x - mx) ** 2 for x in xs)
  return {'slope': sxy / sxx, 'intercept': my - sxy / sxx * mx}
