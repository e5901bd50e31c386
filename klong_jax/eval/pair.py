"""One (task, seed) of an eval: agent episode in a sandbox, then each graded submission (the final
one and, for score-vs-time, the git commits the agent made before each budget cut) is re-run with
reproduce.sh in a FRESH sandbox and graded against the rubric (JAX-free).

Uses the rollout pieces (scaffold.run_episode, make_sandbox, run_reproduce_in, grade_submission);
everything is written under `pair_dir`, which the runner renames into place when it is complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from typing import Any

from absl import logging

from klong_jax.agent import scaffold
from klong_jax.eval import timeline as tl
from klong_jax.eval.scores import score_tree
from klong_jax.fileio import atomic_write_text
from klong_jax.grading import reproduce as reproduce_lib
from klong_jax.grading.grade import grade_submission
from klong_jax.grading.judge_queue import EVAL_PRIORITY
from klong_jax.grading.rubric import report, save_rubric
from klong_jax.rollout import episode
from klong_jax.rollout.episode_config import ROLE_DEFAULTS, EpisodeConfig
from klong_jax.sandbox import base as sandbox_lib

DEFAULT_INSTRUCTIONS = (
    "Reproduce the results of the paper. Write your code in the submission folder, commit your "
    "progress with git regularly, and provide reproduce.sh, which is re-run in a fresh container.")
_SNAP_ROOT = "/workspace/.klong_snapshots"


@dataclasses.dataclass(frozen=True)
class PairSettings:
  """What one (task, seed) needs from the eval config (picklable, no client objects).

  The episode (budget = `episode.time_limit_s`, sandbox, sampling, context policy) is the one
  EpisodeConfig, with the eval role's defaults.
  """

  episode: EpisodeConfig = ROLE_DEFAULTS["eval"]
  variant: str = "full"
  grade_snapshots: bool = True

  @property
  def budget_s(self) -> float:
    return self.episode.time_limit_s


def list_commits(sb: Any) -> list[tuple[str, float]]:
  """(sha, unix commit time) of the submission repo's history, oldest first; [] without git."""
  q = shlex.quote(sandbox_lib.SUBMISSION)
  res = sb.exec(f"test -d {q}/.git && git -C {q} log --format='%H %ct' --reverse 2>/dev/null",
                timeout_s=60)
  out = []
  for line in res.output.splitlines() if res.exit_code == 0 else []:
    parts = line.split()
    if len(parts) == 2 and len(parts[0]) == 40 and parts[1].isdigit():
      out.append((parts[0], float(parts[1])))
  return out


def export_commit(sb: Any, sha: str, host_dest: str) -> None:
  """Copies the tree of commit `sha` (committed files only) out of the sandbox to host_dest."""
  q = shlex.quote(sandbox_lib.SUBMISSION)
  dest = f"{_SNAP_ROOT}/{sha}"
  res = sb.exec(f"mkdir -p {dest} && git -C {q} archive {sha} | tar -x -C {dest}", timeout_s=300)
  if res.exit_code != 0:
    raise sandbox_lib.SandboxError(f"git archive of {sha} failed: {res.output[-500:]}")
  sb.get_dir(dest, host_dest)


def grade_dir(task: Any, st: PairSettings, judge: Any, src_dir: str, out_dir: str,
              commands: list[str]) -> dict[str, Any]:
  """Reproduces `src_dir` in a fresh sandbox (full variant), grades it, writes the graded tree.

  Writes out_dir/{submission/ (after reproduce.sh, with reproduce.log), graded_tree.json,
  graded_tree.md}; returns the score record.
  """
  code_dev = st.variant == "code_dev"
  files = sandbox_lib.files_from_dir(src_dir) if os.path.isdir(src_dir) else {}
  host_sub = os.path.join(out_dir, "submission")
  timeout = st.episode.reproduce_timeout(task)
  with st.episode.sandbox() as fresh:
    fresh.exec(f"mkdir -p {sandbox_lib.SUBMISSION}", timeout_s=30)
    repro = None
    if code_dev:
      if files:
        fresh.put_files(files, dest=sandbox_lib.SUBMISSION)
      if files:
        shutil.copytree(src_dir, host_sub, dirs_exist_ok=True)
      os.makedirs(host_sub, exist_ok=True)
    else:
      res, started = reproduce_lib.run_reproduce_in(fresh, files, timeout)
      if "reproduce.sh" in files:  # What reproduce.sh left; if it made that uncollectable,
        sandbox_lib.collect_submission(fresh, host_sub)  # checks still read it in `fresh`.
      elif files:
        shutil.copytree(src_dir, host_sub, dirs_exist_ok=True)
      os.makedirs(host_sub, exist_ok=True)
      log = os.path.join(host_sub, "reproduce.log")
      if not os.path.exists(log):
        atomic_write_text(log, res.output)
      repro = reproduce_lib.ReproduceResult(res, res.output, host_sub, started)
    graded = grade_submission(task, fresh, sandbox_lib.SUBMISSION, repro, judge,
                              commands=commands, host_submission_dir=host_sub, code_dev=code_dev,
                              run_reproduce_if_missing=False, priority=EVAL_PRIORITY)
  scored = score_tree(graded.tree)
  tree = scored.pop("tree")
  save_rubric(tree, os.path.join(out_dir, "graded_tree.json"))
  atomic_write_text(os.path.join(out_dir, "graded_tree.md"), report(tree) + "\n")
  return {**scored, "disqualified": graded.disqualified, "reproduce": graded.reproduce}


def run_pair(task: Any, seed: int, st: PairSettings, client: Any, judge: Any,
             pair_dir: str) -> dict[str, Any]:
  """Runs the agent once on `task`, grades the final submission and the budget-cut snapshots.

  Returns the result record (also the runner's result.json). Infra failures (SandboxError,
  client InfraError, OSError) propagate for the runner to retry.
  """
  acfg = st.episode.agent_config()
  prefix = scaffold.initial_messages(task.config.get("instructions", DEFAULT_INSTRUCTIONS),
                                     task.paper_md, task.addendum_md, st.budget_s)
  final_src = os.path.join(pair_dir, "agent_submission")
  snaps_src = os.path.join(pair_dir, "snapshots_src")
  cuts = tl.budget_cuts(st.budget_s)
  started_at = time.time()
  with st.episode.sandbox() as sb:
    episode.prepare_sandbox(sb, task)
    t0 = time.time()
    wall_s = st.episode.wall_s()
    ep = episode.run_guarded(client, sb, prefix, acfg, wall_s)
    end_s = time.time() - t0
    # Commit times have 1 s resolution: count a commit at the end of its second (never early).
    commits = [(sha, min(end_s, max(0.0, ct + 1.0 - t0))) for sha, ct in list_commits(sb)]
    sources = tl.pick_sources(cuts, commits, end_s)
    shas = sorted({s for s in sources if s not in (None, tl.FINAL)}) if st.grade_snapshots else []
    failed: dict[str, str] = {}
    for sha in shas:
      try:
        export_commit(sb, sha, os.path.join(snaps_src, sha))
      except sandbox_lib.SandboxError as e:  # A broken commit costs its cut, not the pair.
        logging.warning("eval: %s: snapshot %s not exported: %s", task.id, sha, e)
        failed[sha] = str(e)[:500]
    shas = [sha for sha in shas if sha not in failed]
    sb.exec(f"mkdir -p {sandbox_lib.SUBMISSION}", timeout_s=30)  # Even if the agent removed it.
    # A submission the agent made uncollectable is graded as empty, not retried as infra.
    _, failure = sandbox_lib.collect_submission(sb, final_src)
    if failure:
      logging.warning("eval: %s: submission graded as empty: %s", task.id,
                      failure["failure_detail"])
  commands = episode.agent_commands(ep.messages)
  final = grade_dir(task, st, judge, final_src, pair_dir, commands)
  snap_scores = {}
  for sha in shas:
    d = os.path.join(pair_dir, "snapshots", sha)
    snap_scores[sha] = grade_dir(task, st, judge, os.path.join(snaps_src, sha), d, commands)
  shutil.rmtree(snaps_src, ignore_errors=True)
  shutil.rmtree(final_src, ignore_errors=True)
  timeline = []
  for cut, src in zip(cuts, sources, strict=True):
    if src == tl.FINAL:
      rec = final
    elif src is None or src not in snap_scores:
      rec = None
    else:
      rec = snap_scores[src]
    timeline.append({"cut_s": cut, "source": src if rec is not None else None,
                     "score": 0.0 if rec is None else rec["score"],
                     "judge_failures": 0 if rec is None else rec["judge_failures"],
                     "note": "" if rec is not None else (
                         "no commit before this cut: nothing to grade" if src is None else
                         f"snapshot export failed: {failed[src]}" if src in failed else
                         "snapshot grading disabled")})
  atomic_write_text(os.path.join(pair_dir, "trajectory.json"),
                    json.dumps({"messages": ep.messages, "prefix_messages": ep.prefix_messages},
                               default=str) + "\n")
  return {
      "task_id": task.id, "seed": seed, "status": ep.status, "end_reason": ep.end_reason,
      "score": final["score"], "category_scores": final["category_scores"],
      "judge_failures": final["judge_failures"], "n_leaves": final["n_leaves"],
      "grading_failed": final["grading_failed"], "disqualified": final["disqualified"],
      "reproduce": final["reproduce"], "submit_time_s": end_s, "steps": ep.steps,
      "agent_retry_s": ep.retry_s, "commits": [{"sha": s, "t_s": t} for s, t in commits],
      "timeline": timeline, **failure, "variant": st.variant, "model": st.episode.model,
      "budget_s": st.budget_s, "budget_clock": ep.clock,
      "started_at": started_at, "finished_at": time.time(),
      "snapshots": {sha: {k: v for k, v in rec.items() if k != "reproduce"}
                    for sha, rec in snap_scores.items()},
  }
