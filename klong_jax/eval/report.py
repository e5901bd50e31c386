"""Eval reports: Markdown and a self-contained HTML page (per-paper table, per-category bars,
score-vs-time plot as inline SVG, links to each graded tree, optional side-by-side comparison).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from typing import Any

from klong_jax.eval import plots
from klong_jax.eval import scores as scores_lib
from klong_jax.eval.timeline import format_duration
from klong_jax.fileio import atomic_write_text
from klong_jax.grading.rubric import CATEGORIES


def pct(v: float | None) -> str:
  return "n/a" if v is None else f"{100 * v:.1f}"


def pm(ms: Mapping[str, Any]) -> str:
  """"mean ± se" in percent ("n/a" pieces where undefined)."""
  if ms.get("mean") is None:
    return "n/a"
  return pct(ms["mean"]) + ("" if ms.get("se") is None else f" ± {pct(ms['se'])}")


def _signed(v: float | None) -> str:
  return "n/a" if v is None else f"{100 * v:+.1f}"


def load_summary(out: str) -> dict[str, Any]:
  path = os.path.join(out, "summary.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; run the eval there first (or --report_only "
                            "after it has results)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _label(out: str, summary: Mapping[str, Any]) -> str:
  model = (summary.get("config") or {}).get("model")
  name = os.path.basename(os.path.normpath(out))
  return f"{name} ({model})" if model else name


def _warnings(s: Mapping[str, Any]) -> list[str]:
  w = []
  jf = s["judge_failures"]
  if jf["total"]:
    pairs = ", ".join(f"{p['task_id']}/seed{p['seed']}: {p['judge_failures']}/{p['n_leaves']}"
                      for p in jf["pairs"])
    w.append(f"{jf['total']} judge failure(s), scored 0 as PaperBench does: {pairs}")
  if s["missing_pairs"]:
    w.append("unfinished pairs (left out; their seeds are incomplete): " +
             ", ".join(f"{t}/seed{k}" for t, k in s["missing_pairs"]))
  for t, k, why in s.get("disqualified", []):
    w.append(f"{t}/seed{k} disqualified: {why}")
  for key, p in (s.get("pairs") or {}).items():
    if p.get("grading_failed"):
      w.append(f"{key}: grading failed (every leaf invalid)")
  return w


def _paper_rows(s: Mapping[str, Any], base: str) -> list[list[tuple[str, str | None]]]:
  """Rows of (text, link) cells: paper, one score per seed, mean ± se, judge failures, trees."""
  rows = []
  pairs = s.get("pairs") or {}
  for t in s["task_ids"]:
    p = s["papers"][t]
    row: list[tuple[str, str | None]] = [(t, None)]
    fails, links = 0, []
    for seed in s["seeds"]:
      info = pairs.get(f"{t}/{seed}")
      if info is None:
        row.append(("—", None))
        continue
      tree = os.path.join(base, info["dir"], "graded_tree.json")
      flag = " ⚠" if info.get("judge_failures") else ""
      row.append((pct(info["score"]) + flag, tree))
      fails += int(info.get("judge_failures") or 0)
      links.append((f"s{seed}", os.path.join(base, info["dir"], "graded_tree.md")))
    row.append((pm(p), None))
    row.append((str(fails), None))
    row.extend(links)
    rows.append(row)
  return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def _md_cell(cell: tuple[str, str | None]) -> str:
  text, link = cell
  return f"[{text}]({link})" if link else text


def markdown(out: str, s: Mapping[str, Any], other: tuple[str, Mapping[str, Any]] | None = None
             ) -> str:
  """The Markdown report (links relative to `out`)."""
  cfg = s.get("config") or {}
  lines = [f"# Evaluation: {_label(out, s)}", ""]
  lines.append(f"Variant **{cfg.get('variant', '?')}**, budget "
               f"**{format_duration(float(cfg.get('budget_s', 0) or 0))}**, "
               f"{len(s['task_ids'])} papers x {len(s['seeds'])} seeds, model "
               f"`{cfg.get('model', '?')}`.")
  lines += ["", f"## Score: **{pm(s['overall'])}** %", "",
            f"Mean over papers of the rubric root score, then mean ± standard error over "
            f"{s['overall']['n']} complete seed run(s)."]
  for w in _warnings(s):
    lines.append(f"\n> **Warning:** {w}")
  seeds = [f"seed {k}" for k in s["seeds"]]
  rows = _paper_rows(s, ".")
  lines += ["", "## Per paper", "",
            _md_table(["paper", *seeds, "mean ± se", "judge failures", "graded trees"],
                      [[_md_cell(c) for c in r[:len(seeds) + 3]] +
                       [" ".join(_md_cell(c) for c in r[len(seeds) + 3:]) or "—"]
                       for r in rows])]
  runs = s["runs"]
  lines += ["", "## Per seed run", "", _md_table(
      ["seed", "score", "complete"],
      [[k, pct(runs[str(k)]["score"]), "yes" if runs[str(k)]["complete"] else
        "no (missing " + ", ".join(runs[str(k)]["missing"]) + ")"] for k in s["seeds"]])]
  lines += ["", "## Per category", "", _md_table(
      ["category", "mean ± se"], [[c, pm(s["categories"][c])] for c in CATEGORIES])]
  if s["timeline"]:
    lines += ["", "## Score vs time budget", "",
              "Score if the budget had been cut at each time (graded git commits made by then; "
              "the final submission once the agent had stopped).", "", _md_table(
                  ["cut", "mean ± se"],
                  [[format_duration(p["cut_s"]), pm(p)] for p in s["timeline"]])]
  if other is not None:
    lines += ["", _md_compare(out, s, *other)]
  return "\n".join(lines) + "\n"


def _md_compare(out: str, s: Mapping[str, Any], other_out: str,
                o: Mapping[str, Any]) -> str:
  c = scores_lib.compare(o, s)
  a_label, b_label = _label(other_out, o), _label(out, s)
  rows = [["**overall**", pm(o["overall"]), pm(s["overall"]), _signed(c["overall"]["diff"]),
           pct(c["overall"]["se"]), _yn(c["overall"]["exceeds_se"])]]
  for t, d in c["papers"].items():
    rows.append([t, pm(o["papers"].get(t, {})), pm(s["papers"].get(t, {})), _signed(d["diff"]),
                 pct(d["se"]), _yn(d["exceeds_se"])])
  for cat, d in c["categories"].items():
    rows.append([f"*{cat}*", pm(o["categories"][cat]), pm(s["categories"][cat]),
                 _signed(d["diff"]), pct(d["se"]), _yn(d["exceeds_se"])])
  note = "" if c["same_tasks"] else "\n\n> **Warning:** the two runs cover different papers."
  return (f"## Comparison: A = {a_label} ({os.path.relpath(other_out, out)}), B = {b_label}\n\n"
          + _md_table(["", "A", "B", "B − A", "se of diff", "diff > se?"], rows) + note
          + _md_paired(c.get("paired")))


def _md_paired(p: Mapping[str, Any] | None) -> str:
  """The paired (paper x seed) difference line of a comparison ("" without per-pair scores)."""
  if not p or not p["n_pairs"]:
    return ""
  from klong_jax.eval.stats import fmt  # noqa: PLC0415
  return (f"\n\nPaired over {p['n_pairs']} (paper, seed) pairs run by both: B − A "
          f"{fmt(p['paired_t'], signed=True)} (95% paired t; bootstrap "
          f"{fmt(p['paired_bootstrap'], signed=True)}; unpaired Welch "
          f"{fmt(p['welch'], signed=True)}).")


def _yn(v: bool | None) -> str:
  return "n/a" if v is None else ("yes" if v else "no")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#222;padding:0 16px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f2f4f7}td:first-child,th:first-child{text-align:left}
.big{font-size:2em;font-weight:600}.warn{background:#fff4e5;border-left:4px solid #e8a33d;
padding:6px 10px;margin:6px 0}.pos{color:#1a7f37}.neg{color:#b42318}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts svg{max-width:520px;height:auto}
.muted{color:#666;font-size:.9em}
"""


def _h(text: Any) -> str:
  return html.escape(str(text))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
  head = "".join(f"<th>{_h(x)}</th>" for x in header)
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_cell(cell: tuple[str, str | None]) -> str:
  text, link = cell
  return f'<a href="{_h(link)}">{_h(text)}</a>' if link else _h(text)


def _diff_cell(d: Mapping[str, Any]) -> str:
  if d["diff"] is None:
    return "n/a"
  cls = "pos" if d["diff"] > 0 else "neg" if d["diff"] < 0 else ""
  return f'<span class="{cls}">{_h(_signed(d["diff"]))}</span>'


def html_report(out: str, s: Mapping[str, Any],
                other: tuple[str, Mapping[str, Any]] | None = None) -> str:
  """The self-contained HTML report (inline CSS and SVG; links relative to `out`)."""
  cfg = s.get("config") or {}
  label = _label(out, s)
  parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Eval: {_h(label)}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>Evaluation: {_h(label)}</h1>",
           f"<p class='muted'>variant <b>{_h(cfg.get('variant', '?'))}</b> · budget "
           f"<b>{_h(format_duration(float(cfg.get('budget_s', 0) or 0)))}</b> · "
           f"{len(s['task_ids'])} papers × {len(s['seeds'])} seeds · model "
           f"<code>{_h(cfg.get('model', '?'))}</code></p>",
           f"<div class='big'>{_h(pm(s['overall']))} %</div><p class='muted'>mean over papers "
           "of the rubric root score; mean ± standard error over "
           f"{s['overall']['n']} complete seed run(s)</p>"]
  parts += [f"<div class='warn'>⚠ {_h(w)}</div>" for w in _warnings(s)]
  seeds = [f"seed {k}" for k in s["seeds"]]
  rows = [[_html_cell(c) for c in r[:len(seeds) + 3]] +
          [" ".join(_html_cell(c) for c in r[len(seeds) + 3:]) or "—"]
          for r in _paper_rows(s, ".")]
  for r, t in zip(rows, s["task_ids"], strict=True):
    title = (s.get("titles") or {}).get(t)
    if title:
      r[0] = f"{_h(t)}<br><span class='muted'>{_h(title)}</span>"
  parts += ["<h2>Per paper</h2>", _html_table(
      ["paper", *seeds, "mean ± se", "judge failures", "graded trees"], rows),
      "<p class='muted'>Scores link to the graded tree (JSON, PaperBench format); s0, s1… link "
      "to its readable report. ⚠ = judge failures in that tree.</p>"]
  runs_cmp = [(label, s)] if other is None else [(_label(*other), other[1]), (label, s)]
  charts = [plots.category_bars(runs_cmp)]
  tl_svg = plots.score_vs_time(runs_cmp)
  if tl_svg:
    charts.append(tl_svg)
  parts += ["<h2>Per category and over time</h2>",
            "<div class='charts'>" + "".join(f"<div>{c}</div>" for c in charts) + "</div>"]
  parts.append(_html_table(["category", "mean ± se"],
                           [[_h(c), _h(pm(s["categories"][c]))] for c in CATEGORIES]))
  if s["timeline"]:
    parts.append(_html_table(["budget cut", "mean ± se"],
                             [[_h(format_duration(p["cut_s"])), _h(pm(p))]
                              for p in s["timeline"]]))
  runs = s["runs"]
  parts += ["<h2>Per seed run</h2>", _html_table(
      ["seed", "score", "complete"],
      [[_h(k), _h(pct(runs[str(k)]["score"])), _h("yes" if runs[str(k)]["complete"] else
                                                  "no: missing " +
                                                  ", ".join(runs[str(k)]["missing"]))]
       for k in s["seeds"]])]
  if other is not None:
    parts.append(_html_compare(out, s, *other))
  parts.append("</body></html>")
  return "\n".join(parts) + "\n"


def _html_compare(out: str, s: Mapping[str, Any], other_out: str,
                  o: Mapping[str, Any]) -> str:
  c = scores_lib.compare(o, s)
  rows = [["<b>overall</b>", _h(pm(o["overall"])), _h(pm(s["overall"])),
           _diff_cell(c["overall"]), _h(pct(c["overall"]["se"])),
           _h(_yn(c["overall"]["exceeds_se"]))]]
  for t, d in c["papers"].items():
    rows.append([_h(t), _h(pm(o["papers"].get(t, {}))), _h(pm(s["papers"].get(t, {}))),
                 _diff_cell(d), _h(pct(d["se"])), _h(_yn(d["exceeds_se"]))])
  for cat, d in c["categories"].items():
    rows.append([f"<i>{_h(cat)}</i>", _h(pm(o["categories"][cat])), _h(pm(s["categories"][cat])),
                 _diff_cell(d), _h(pct(d["se"])), _h(_yn(d["exceeds_se"]))])
  rel = os.path.relpath(os.path.join(other_out, "report.html"), out)
  warn = "" if c["same_tasks"] else "<div class='warn'>⚠ the two runs cover different papers</div>"
  return (f"<h2>Comparison</h2><p>A = <a href='{_h(rel)}'>{_h(_label(other_out, o))}</a>, "
          f"B = {_h(_label(out, s))} (this run). Positive = B better.</p>{warn}"
          + _html_table(["", "A", "B", "B − A", "se of diff", "diff > se?"], rows))


def write_reports(out: str, summary: Mapping[str, Any] | None = None,
                  compare_dir: str | None = None) -> tuple[str, str]:
  """Writes out/report.md and out/report.html (atomic); returns their paths."""
  s = summary if summary is not None else load_summary(out)
  other = None if not compare_dir else (compare_dir, load_summary(compare_dir))
  md_path, html_path = os.path.join(out, "report.md"), os.path.join(out, "report.html")
  atomic_write_text(md_path, markdown(out, s, other))
  atomic_write_text(html_path, html_report(out, s, other))
  return md_path, html_path
