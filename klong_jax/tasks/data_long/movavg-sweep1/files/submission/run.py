"""Experiment harness: python3 run.py K runs setting K of runs.json; python3 run.py table."""
import json, os, sys

import solution

runs = json.load(open('runs.json'))
os.makedirs('results', exist_ok=True)
done = sorted(f for f in os.listdir('results') if f.startswith('run_'))
arg = sys.argv[1] if len(sys.argv) > 1 else ''
if arg == 'table':
  rows = {f[4:-5]: json.load(open('results/' + f)) for f in done}
  json.dump(rows, open('results/table.json', 'w'), indent=1)
  print(f'table: {len(rows)}/{len(runs)} runs')
elif arg.isdigit() and 1 <= int(arg) <= len(runs):
  k = int(arg)
  m = solution.moving_average(**runs[k - 1])
  json.dump(m, open(f'results/run_{k}.json', 'w'))
  n = len(set(done) | {f'run_{k}.json'})
  print(f'run {k}: {m}')
  print(f'{n}/{len(runs)} runs done')
else:
  print(f'usage: python3 run.py K (K = 1..{len(runs)}) | python3 run.py table')
  sys.exit(2)
