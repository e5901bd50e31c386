def moving_average(values, w):
  m = [sum(values[i:i + w]) / w for i in range(len(values) - w + 1)]
  return {'last': m[-1], 'peak': max(m)}
