"""`make bench`: runs every benchmark script, then writes one JSON + a Markdown summary table.

  python -m benchmarks.run_all [--only=train_step,moe] [--cap_s=900] [--results=benchmarks/results]

Each `benchmarks/<name>.py` runs as `python -m benchmarks.<name> --out=<file>` in its own
subprocess under a wall-clock cap (a hung or failed script is recorded, the rest still run),
with a progress line every few seconds. Results go to `<results>/<host>-<date>.json` (every
script's full JSON, status, seconds) and `<host>-<date>.md`. The table shows each figure beside
its baseline from the same run and the ratio figure / baseline: a script can list its own rows
under a top-level "summary" key ({metric, value, unit, baseline?, baseline_value?}); the known
scripts' layouts are read by the extractors below; anything else gets its numeric top-level keys.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP = {"run_all", "__init__"}
# Per-script caps (seconds) where the default is too short or too long.
CAPS = {"sandbox": 1200, "rl_loop": 900, "prefix_cache": 1200, "sampler_scaling": 1200}

_ONLY = flags.DEFINE_list("only", [], "Run just these benchmarks (names without .py).")
_CAP = flags.DEFINE_integer("cap_s", 900, "Default wall-clock cap per script, seconds.")
_RESULTS = flags.DEFINE_string("results", os.path.join(HERE, "results"), "Output directory.")
_EVERY = flags.DEFINE_float("progress_s", 10.0, "Seconds between progress lines.")


@dataclasses.dataclass
class Row:
  """One line of the summary table: a figure, and its same-run baseline where one exists."""

  benchmark: str
  metric: str
  value: float
  unit: str = ""
  baseline: str = ""
  baseline_value: float | None = None

  @property
  def ratio(self) -> float | None:
    if self.baseline_value in (None, 0):
      return None
    return self.value / self.baseline_value


def discover(directory: str = HERE) -> list[str]:
  """Benchmark module names in `directory` (every *.py but run_all/__init__), sorted."""
  return sorted(f[:-3] for f in os.listdir(directory)
                if f.endswith(".py") and f[:-3] not in SKIP and not f.startswith("_"))


# ---------- per-script extractors: result JSON -> rows ----------

def _data(r: dict) -> list[Row]:
  res = {x["workers"]: x["packed_tokens_per_s"] for x in r.get("results", [])}
  base = res.get(0)
  return [Row("data", f"packed tokens/s, {w} workers", v, "tok/s",
              "0 workers" if w != 0 else "", base if w != 0 else None) for w, v in res.items()]


def _sandbox(r: dict) -> list[Row]:
  rows = [Row("sandbox", f"{k} p50", r[k]["p50"], "s")
          for k in ("container_start_s", "start_to_first_exec_s", "exec_round_trip_s") if k in r]
  fleet = r.get("fleet", {})
  base = fleet.get("1", {}).get("episodes_per_min")
  for w, v in fleet.items():
    rows.append(Row("sandbox", f"episodes/min, {w} workers", v["episodes_per_min"], "ep/min",
                    "1 worker" if w != "1" else "", base if w != "1" else None))
  return rows


def _moe(r: dict) -> list[Row]:
  paths = r.get("expert_paths", {}).get("results", {})
  dense = paths.get("dense", {})
  rows = []
  for name, v in paths.items():
    for key, label in (("fwd_tokens_per_s", "fwd"), ("fwd_grad_tokens_per_s", "fwd+grad")):
      if key in v:
        rows.append(Row("moe", f"experts {name} {label} tokens/s", v[key], "tok/s",
                        "dense" if name != "dense" else "",
                        dense.get(key) if name != "dense" else None))
  for name, v in r.get("presets", {}).items():
    rows.append(Row("moe", f"{name} forward tokens/s", v["fwd_tokens_per_s"], "tok/s"))
  return rows


def _sampler(r: dict) -> list[Row]:
  rows = []
  decode = r.get("decode_tokens_per_s", {})
  for key, v in decode.items():
    preset, batch = key.split("/")
    base = decode.get(f"{preset}/b1")
    rows.append(Row("sampler", f"{preset} decode tokens/s, batch {batch[1:]}", v, "tok/s",
                    "batch 1" if batch != "b1" else "", base if batch != "b1" else None))
  b = r.get("batching", {})
  if "continuous_tokens_per_s" in b:
    rows.append(Row("sampler", "continuous batching tokens/s", b["continuous_tokens_per_s"],
                    "tok/s", "static", b.get("static_tokens_per_s")))
  return rows


def _rl_loop(r: dict) -> list[Row]:
  rows = []
  sync = r.get("sync", {}).get("trajectories_per_hour")
  for mode in ("sync", "async"):
    if mode in r:
      rows.append(Row("rl_loop", f"{mode} trajectories/hour", r[mode]["trajectories_per_hour"],
                      "traj/h", "sync" if mode == "async" else "",
                      sync if mode == "async" else None))
      rows.append(Row("rl_loop", f"{mode} trainer utilisation", r[mode]["utilisation"], ""))
  return rows


def _hf_io(r: dict) -> list[Row]:
  rows = [Row("hf_io", "export MB/s", r["export_MBps"], "MB/s")]
  imports = r.get("imports", [])
  base = imports[0]["import_MBps"] if imports else None
  for i, run in enumerate(imports):
    label = f"{run.get('devices', i)} device(s)"
    rows.append(Row("hf_io", f"import MB/s, {label}", run["import_MBps"], "MB/s",
                    f"{imports[0].get('devices', 0)} device(s)" if i else "",
                    base if i else None))
    rows.append(Row("hf_io", f"import RSS growth / params, {label}",
                    run["rss_growth_over_params"], "x"))
  return rows


EXTRACTORS: dict[str, Callable[[dict], list[Row]]] = {
    "data": _data, "sandbox": _sandbox, "moe": _moe, "sampler": _sampler, "rl_loop": _rl_loop,
    "hf_io": _hf_io}


def rows_for(name: str, result: dict) -> list[Row]:
  """Summary rows of one script's JSON: its own `summary`, a known extractor, or numeric keys."""
  if isinstance(result.get("summary"), list):
    return [Row(name, s["metric"], float(s["value"]), s.get("unit", ""), s.get("baseline", ""),
                s.get("baseline_value")) for s in result["summary"]]
  if name in EXTRACTORS:
    try:
      return EXTRACTORS[name](result)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
      return [Row(name, f"(could not read result layout: {e!r})", float("nan"))]
  return [Row(name, k, float(v)) for k, v in result.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _fmt(v: float | None) -> str:
  if v is None:
    return ""
  if v != v:  # NaN
    return "nan"
  return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"


def markdown(rows: Sequence[Row], runs: dict[str, dict], header: str) -> str:
  """The Markdown summary: a status line per script, then the figures table."""
  out = [f"# Benchmarks: {header}", "", "| benchmark | status | seconds |", "|---|---|---|"]
  out += [f"| {n} | {r['status']} | {r['seconds']:.0f} |" for n, r in runs.items()]
  out += ["", "| benchmark | metric | value | unit | baseline (same run) | baseline value "
          "| ratio |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    out.append(f"| {r.benchmark} | {r.metric} | {_fmt(r.value)} | {r.unit} | {r.baseline} | "
               f"{_fmt(r.baseline_value)} | {_fmt(r.ratio)}{'x' if r.ratio is not None else ''} |")
  return "\n".join(out) + "\n"


def _print(line: str) -> None:
  print(line, flush=True)


def run_one(name: str, out_json: str, cap_s: float, every_s: float, tag: str,
            log: Callable[[str], None] = _print, package: str = "benchmarks",
            cwd: str = os.path.dirname(HERE)) -> dict[str, Any]:
  """Runs `python -m <package>.<name> --out=out_json` under a cap; returns status + result."""
  cmd = [sys.executable, "-m", f"{package}.{name}", f"--out={out_json}"]
  t0 = time.perf_counter()
  done = threading.Event()

  def progress() -> None:
    while not done.wait(every_s):
      log(f"{tag} {name}: running {time.perf_counter() - t0:.0f} s (cap {cap_s:.0f} s)")

  ticker = threading.Thread(target=progress, daemon=True)
  ticker.start()
  try:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=cap_s)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    tail = (proc.stdout + proc.stderr)[-2000:]
  except subprocess.TimeoutExpired as e:
    status, tail = f"timeout after {cap_s:.0f} s", str(e.stderr or "")[-2000:]
  finally:
    done.set()
  seconds = time.perf_counter() - t0
  result = None
  if status == "ok":
    try:
      with open(out_json) as f:
        result = json.load(f)
    except (OSError, ValueError) as e:
      status = f"failed (no readable result: {e})"
  log(f"{tag} {name}: {status} in {seconds:.0f} s")
  return {"status": status, "seconds": seconds, "result": result,
          "log_tail": None if status == "ok" else tail}


def _atomic_write(path: str, text: str) -> None:
  with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False,
                                   suffix=".tmp") as f:
    f.write(text)
  os.replace(f.name, path)


def run_all(names: Sequence[str], results_dir: str, cap_s: float = 900, every_s: float = 10,
            caps: dict[str, float] | None = None, package: str = "benchmarks",
            cwd: str = os.path.dirname(HERE)) -> tuple[str, str, dict[str, dict]]:
  """Runs `names` one after another; returns (json path, markdown path, per-script runs)."""
  caps = CAPS if caps is None else caps
  os.makedirs(results_dir, exist_ok=True)
  host = platform.node() or "host"
  stamp = datetime.datetime.now().strftime("%Y-%m-%d")
  runs: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, name in enumerate(names):
      runs[name] = run_one(name, os.path.join(tmp, f"{name}.json"), caps.get(name, cap_s),
                           every_s, f"[{i + 1}/{len(names)}]", package=package, cwd=cwd)
  rows = [row for n, r in runs.items() if r["result"] for row in rows_for(n, r["result"])]
  base = os.path.join(results_dir, f"{host}-{stamp}")
  report = {"host": host, "date": stamp, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "runs": runs,
            "summary": [dataclasses.asdict(r) | {"ratio": r.ratio} for r in rows]}
  _atomic_write(base + ".json", json.dumps(report, indent=2))
  _atomic_write(base + ".md", markdown(rows, runs, f"{host}, {stamp}"))
  return base + ".json", base + ".md", runs


def main(argv: list[str]) -> None:
  del argv
  names = discover()
  if _ONLY.value:
    unknown = sorted(set(_ONLY.value) - set(names))
    if unknown:
      raise app.UsageError(f"--only names {unknown} are not in benchmarks/; have {names}")
    names = [n for n in names if n in _ONLY.value]
  print(f"bench: {len(names)} scripts: {', '.join(names)}", flush=True)
  json_path, md_path, runs = run_all(names, _RESULTS.value, _CAP.value, _EVERY.value)
  with open(md_path) as f:
    print(f.read())
  print(f"wrote {json_path} and {md_path}")
  if any(r["status"] != "ok" for r in runs.values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
