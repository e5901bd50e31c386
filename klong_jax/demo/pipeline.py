"""`make demo`: the whole KLong pipeline on one CPU box, top to bottom.

  python -m klong_jax.demo --workdir=runs/demo [--config=configs/demo.py:seed=1]

Phases (each a log line with elapsed time and ETA): tokenizer -> distill the scripted teacher on
the TRAIN tasks -> split-SFT the tiny MoE -> held-out eval of the SFT policy -> progressive RL
(trainer + server + N workers as separate processes) -> held-out eval of the RL policy -> export
the serving bundle and answer one chat request from a server started from the bundle alone ->
summary table + reward plot (`<workdir>/summary.json`, `<workdir>/reward.png`).
Every phase that finished (its output exists) is skipped on a re-run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from klong_jax import config_util, fileio
from klong_jax.demo import domain_tokenizer, rewards, summary
from klong_jax.launch import experiment as xp
from klong_jax.launch import procs

PHASES = ("tokenizer", "distill", "sft", "eval_sft", "rl", "eval_rl", "export", "summary")


def _run_role(c: ml_collections.ConfigDict, workdir: str, name: str, module: str,
              args: dict[str, Any], timeout_s: float = 3600.0, positional: tuple = ()) -> None:
  """Runs one phase command as a logged child process; raises with the log tail on failure."""
  exe = xp.Executable(module, args, positional=positional)
  with procs.ProcessGroup(os.path.join(workdir, "logs")) as group:
    group.start(procs.Role(name, exe.argv(c.python)))
    print(f"    $ {' '.join(exe.argv(c.python))}\n    log: {group.log_path(name)}", flush=True)
    code = group.wait(name, timeout_s)
    if code:
      raise procs.RoleError(f"{name} failed with code {code}; log {group.log_path(name)}:\n"
                            f"{procs.log_tail(group.log_path(name))}")


EVAL_SETS = ("heldout", "rl")


def eval_sets(c: ml_collections.ConfigDict) -> list[str]:
  """The task sets each eval phase scores (`eval.sets`: heldout, rl = the RL tasks)."""
  sets = [x.strip() for x in str(c.eval.get("sets", "heldout")).split(",") if x.strip()]
  bad = [x for x in sets if x not in EVAL_SETS]
  if bad or not sets:
    raise ValueError(f"eval.sets={c.eval.get('sets')!r}: each must be one of {EVAL_SETS}")
  return sets


def episodes_per_task(c: ml_collections.ConfigDict, tasks: str) -> int:
  """Rollouts per task of an eval on `tasks`: `eval.episodes` spread over its tasks (rounded
  up, so every task gets the same count), or `eval.episodes_per_task` when that is 0."""
  total = int(c.eval.get("episodes", 0))
  if total <= 0:
    return int(c.eval.episodes_per_task)
  n = len(os.listdir(tasks))
  return max(1, -(-total // n))


def eval_dir(phase_dir: str, task_set: str) -> str:
  """Where an eval phase's run on one task set lives (held-out: the phase dir, as before)."""
  return phase_dir if task_set == "heldout" else os.path.join(phase_dir, f"on_{task_set}")


def evaluate_sets(c: ml_collections.ConfigDict, phase_dir: str, policy_dir: str, tokenizer: str,
                  task_dirs: dict[str, str]) -> dict[str, rewards.RewardStats]:
  """One eval of `policy_dir` per task set of `eval.sets`; their rewards by set."""
  return {s: _evaluate(c, eval_dir(phase_dir, s), policy_dir, tokenizer, task_dirs[s])
          for s in eval_sets(c)}


def _evaluate(c: ml_collections.ConfigDict, out: str, policy_dir: str, tokenizer: str,
              tasks: str) -> rewards.RewardStats:
  """One eval: a server on `policy_dir` + workers, one pass; rewards from their shards."""
  stream = os.path.join(out, "stream")
  if not os.path.exists(os.path.join(out, "done")):
    exp = xp.eval_experiment(c, out, policy_dir=policy_dir, tokenizer=tokenizer, tasks=tasks,
                             episodes_per_task=episodes_per_task(c, tasks))
    xp.run_local(exp, timeout_s=c.eval.timeout_s, printer=lambda s: print("  " + s, flush=True))
    with open(os.path.join(out, "done"), "w") as f:
      f.write("ok\n")
  stats = rewards.read_rewards(stream)
  if not stats.rewards:
    raise procs.RoleError(
        f"evaluation in {out} produced no graded rollout ({stats.infra_errors} infra errors, "
        f"statuses {stats.statuses}); see the worker logs in {os.path.join(out, 'logs')}")
  return stats


def _chat_from_bundle(c: ml_collections.ConfigDict, workdir: str, bundle: str) -> str:
  """Starts a server from the bundle alone and answers one chat request; returns the reply."""
  import openai  # noqa: PLC0415

  port = xp.free_port()
  exp = xp.Experiment(f"{c.name}-bundle", os.path.join(workdir, "export"), python=c.python)
  exp.add(xp.Job("bundle_server", xp.Executable("klong_jax.inference.server", {
      "bundle": bundle, "port": port}), ready=f"http://127.0.0.1:{port}/health"))
  with procs.ProcessGroup(exp.log_dir) as group:
    job = exp.jobs[0]
    group.start(procs.Role(job.name, job.executable.argv(c.python),
                           ready=xp.ready_check(job.ready)))
    group.wait_ready(job.name, c.server.ready_timeout_s)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
    resp = client.chat.completions.create(
        model=c.server.model_name, messages=[{"role": "user", "content": c.export.prompt}],
        max_tokens=64, temperature=0.0)
    return resp.choices[0].message.content or ""


def _prefix_tokens(tokenizer: Any, tasks_dir: str) -> int:
  """Tokens of the fixed prompt prefix (system + task + paper + tools block) of the first task."""
  from klong_jax.agent import scaffold  # noqa: PLC0415
  from klong_jax.agent.tools import TOOLS  # noqa: PLC0415
  from klong_jax.data.chat import ChatFormat  # noqa: PLC0415
  from klong_jax.tasks.loader import load_task  # noqa: PLC0415
  task = load_task(os.path.join(tasks_dir, sorted(os.listdir(tasks_dir))[0]))
  msgs = scaffold.initial_messages(task.config.get("instructions", "Reproduce the paper."),
                                   task.paper_md, task.addendum_md)
  return len(ChatFormat(tokenizer).render(msgs, TOOLS).tokens)


def run(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every phase; returns the summary dict (also written to <workdir>/summary.json)."""
  from klong_jax.tasks import bundled_tasks_dir, long_suite  # noqa: PLC0415

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  if c.xla_flags:  # Inherited by every role process (and JAX here, imported later).
    os.environ["XLA_FLAGS"] = c.xla_flags
  if c.backend == "docker":  # What `make demo` does first; the ablation and direct runs too.
    from klong_jax.sandbox import image  # noqa: PLC0415
    image.ensure_image()
  prog = summary.Progress({p: float(c.budgets_s[p]) for p in PHASES})
  out: dict[str, Any] = {"config": c.to_dict(), "phases_s": prog.done}
  root = c.tasks.root or (long_suite.suite_dir() if c.tasks.suite == "long"
                          else bundled_tasks_dir())

  prog.start("tokenizer", f"SentencePiece vocab {c.tokenizer.vocab_size}"
             f"{' (domain-adapted)' if c.tokenizer.domain else ''}")
  train = xp.link_tasks(root, "train", os.path.join(workdir, "tasks", "train"), c.tasks.max_train)
  heldout = xp.link_tasks(root, "heldout", os.path.join(workdir, "tasks", "heldout"),
                          c.tasks.max_heldout)
  rl_tasks = xp.link_rl_tasks(c, root, workdir)
  tok_dir = os.path.join(workdir, "tokenizer")
  # Domain: bundled corpus + TRAIN papers, system prompt, tool schemas, teacher scripts.
  tokenizer = domain_tokenizer.from_config(c, root, tok_dir)
  tok = str(tokenizer.path)
  out["prefix_tokens"] = _prefix_tokens(tokenizer, heldout)
  prog.end(f"{len(os.listdir(train))} train / {len(os.listdir(rl_tasks))} RL / "
           f"{len(os.listdir(heldout))} held-out tasks; "
           f"held-out prompt prefix {out['prefix_tokens']} tokens")

  distill_dir = os.path.join(workdir, "distill")
  prog.start("distill", f"scripted teacher (skill {c.distill.teacher_skill}) on train tasks")
  _run_role(c, workdir, "distill", "klong_jax.factory", {
      "tasks": train, "out": distill_dir, "tokenizer": tok, "split": "train",
      "teacher_skill": c.distill.teacher_skill,
      "teacher_mistakes": c.distill.teacher_mistakes, "seed": c.seed,
      "episodes_per_task": c.distill.episodes_per_task, "threshold": c.distill.threshold,
      "backend": c.backend, "time_limit_s": c.distill.time_limit_s,
      "max_steps": c.distill.max_steps, **xp.context_flags(c)}, positional=("distill",))
  teacher = rewards.read_rewards(os.path.join(distill_dir, "sft"))
  chunks = rewards.chunk_stats(os.path.join(distill_dir, "sft"), c.context)
  out["distill"] = {"kept": len(teacher.rewards), "teacher_mean": teacher.mean, **chunks}
  prog.end(f"kept {len(teacher.rewards)} trajectories (mean score {teacher.mean:.3f}); "
           f"{rewards.format_chunk_stats(chunks)}")

  sft_dir = os.path.join(workdir, "sft")
  ckpt_dir = os.path.join(sft_dir, "checkpoints")
  truncated = bool(c.sft.overrides.get("data", {}).get("truncate", False))
  kind = "truncated-SFT (first max_len tokens only)" if truncated else "split-SFT"
  prog.start("sft", f"{kind} tiny MoE ({config_util.format_arg(c.sft.args)})")
  if not os.path.exists(os.path.join(sft_dir, "done")):
    _run_role(c, workdir, "sft", "klong_jax.train.sft", {
        "config": xp.config_flag(c.sft.config, c.sft.args),
        "workdir": sft_dir, "config.data.shards": os.path.join(distill_dir, "sft"),
        "config.data.tokenizer": tok, "config.seed": c.seed, **xp.context_overrides(c),
        **xp.config_overrides(c.model_overrides), **xp.config_overrides(c.sft.overrides)})
    with open(os.path.join(sft_dir, "done"), "w") as f:
      f.write("ok\n")
  prog.end()
  if c.stop_after == "sft":
    return _finish(workdir, out, prog)

  prog.start("eval_sft", "SFT policy on held-out tasks")
  from klong_jax.train import policy as sft_policy  # noqa: PLC0415 - JAX from here on
  sft_policy_dir = os.path.join(workdir, "eval_sft", "policy")
  if not os.path.isdir(os.path.join(sft_policy_dir, "0")):
    cfg = config_util.load_config(c.sft.config, config_util.format_arg(c.sft.args), {
        **config_util.overrides_dict(c.model_overrides),
        **config_util.overrides_dict(c.sft.overrides)})
    cfg.seed = c.seed
    sft_policy.publish_sft_policy(cfg, ckpt_dir, sft_policy_dir, 0)
  sets = {"heldout": heldout, "rl": rl_tasks}
  evs = evaluate_sets(c, os.path.join(workdir, "eval_sft"), sft_policy_dir, tok, sets)
  ev_sft = _record_eval(out, "sft", evs, prog)
  if c.stop_after == "eval_sft":
    return _finish(workdir, out, prog)

  rl_dir = os.path.join(workdir, "rl")
  prog.start("rl", f"progressive RL: trainer + server + {c.workers.num} workers")
  if not os.path.exists(os.path.join(rl_dir, "done")):
    exp = xp.rl_experiment(c, rl_dir, init_checkpoint=ckpt_dir, tokenizer=tok, tasks=rl_tasks)
    print(exp.describe(), flush=True)

    def tick(group: procs.ProcessGroup) -> None:
      del group
      st = rewards.read_rewards(os.path.join(rl_dir, "stream"))
      prog.note(f"{len(st.rewards)} trajectories, recent mean reward "
                f"{summary.mean_std(st.rewards[-16:])[0]:.3f}")

    xp.run_local(exp, timeout_s=c.rl.timeout_s, on_tick=tick, tick_s=30.0,
                 printer=lambda s: print("  " + s, flush=True))
    with open(os.path.join(rl_dir, "done"), "w") as f:
      f.write("ok\n")
  rl_stream = rewards.read_rewards(os.path.join(rl_dir, "stream"))
  out["rl_endings"] = rewards.endings_by_stage(os.path.join(rl_dir, "stream"))
  out["rl_mismatch"] = summary.trainer_mismatch(_rl_metrics(rl_dir))
  mm = out["rl_mismatch"]
  prog.end(f"{len(rl_stream.rewards)} trajectories, mean reward {rl_stream.mean:.3f}; "
           f"{rewards.format_endings(out['rl_endings'])}; sampler-vs-trainer |dlogp| "
           f"{mm['logprob_gap_mean']:.4f} (max {mm['logprob_gap_max']:.2f}), KL max "
           f"{mm['kl_max']:.2f}, routing flips {mm['routing_flip']:.1%}")

  prog.start("eval_rl", "RL policy on held-out tasks")
  evs = evaluate_sets(c, os.path.join(workdir, "eval_rl"), os.path.join(rl_dir, "policy"), tok,
                      sets)
  ev_rl = _record_eval(out, "rl", evs, prog)
  if c.stop_after == "eval_rl":
    return _finish(workdir, out, prog)

  prog.start("export", "serving bundle + one chat request from it")
  bundle = os.path.join(workdir, "bundle")
  if not os.path.isdir(bundle):
    _run_role(c, workdir, "export", "klong_jax.inference.export", {
        "config": xp.config_flag(c.server.config, c.server.args),
        "policy": os.path.join(rl_dir, "policy"),
        "out": bundle, "bf16": c.export.bf16, "tokenizer": tok,
        "model_name": c.server.model_name,
        **xp.config_overrides(c.model_overrides)})
  reply = _chat_from_bundle(c, workdir, bundle)
  out["chat_reply"] = reply
  prog.end(f"reply: {reply[:80]!r}")

  prog.start("summary")
  out.update(_summarize(workdir, rl_dir, teacher, ev_sft, ev_rl, rl_stream, c.tasks.rl_split))
  prog.end()
  return _finish(workdir, out, prog)


def _record_eval(out: dict[str, Any], phase: str, evs: dict[str, rewards.RewardStats],
                 prog: summary.Progress) -> rewards.RewardStats:
  """Records one eval phase's per-set means in `out` (`heldout_<phase>` from the held-out set,
  else the first) and ends its progress step; returns that set's stats for the summary."""
  ev = evs.get("heldout") or next(iter(evs.values()))
  out[f"heldout_{phase}"], out[f"heldout_{phase}_n"] = ev.mean, len(ev.rewards)
  out[f"eval_sets_{phase}"] = {k: {"mean": v.mean, "n": len(v.rewards)} for k, v in evs.items()}
  prog.end("; ".join(f"{k} mean reward {v.mean:.3f} over {len(v.rewards)} rollouts"
                     for k, v in evs.items()))
  return ev


def _finish(workdir: str, out: dict[str, Any], prog: summary.Progress) -> dict[str, Any]:
  """Writes summary.json. `phases_s`: this run's times (a skipped phase takes ~0 s);
  `phases_first_s`: each phase's time in the first run that finished it (the one that did it)."""
  out["phases_s"] = dict(prog.done)
  first: dict[str, float] = {}
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    first = dict(old.get("phases_first_s") or old.get("phases_s") or {})
  out["phases_first_s"] = {**dict(prog.done), **first}
  fileio.atomic_write_json(os.path.join(workdir, "summary.json"), out)
  return out


def _rl_metrics(rl_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(rl_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def _summarize(workdir: str, rl_dir: str, teacher: rewards.RewardStats,
               ev_sft: rewards.RewardStats, ev_rl: rewards.RewardStats,
               rl_stream: rewards.RewardStats, rl_split: str) -> dict[str, Any]:
  """Prints the summary table and draws the reward plot; returns the numbers."""
  # Train-step records only (the trainer also logs stage-change events with a text "stage").
  hist = [h for h in _rl_metrics(rl_dir) if "loss" in h]
  last = next((h for h in reversed(hist) if "stream/trajectories_used" in h), hist[-1] if hist
              else {})
  rows = [
      {"phase": "teacher (kept, train)", "mean reward": teacher.mean, "n": len(teacher.rewards)},
      {"phase": "after SFT (held-out)", "mean reward": ev_sft.mean, "n": len(ev_sft.rewards),
       "infra errors": ev_sft.infra_errors},
      {"phase": f"RL rollouts ({rl_split} tasks)", "mean reward": rl_stream.mean,
       "n": len(rl_stream.rewards),
       "infra errors": rl_stream.infra_errors},
      {"phase": "after RL (held-out)", "mean reward": ev_rl.mean, "n": len(ev_rl.rewards),
       "infra errors": ev_rl.infra_errors},
  ]
  for row, st in zip(rows, (teacher, ev_sft, rl_stream, ev_rl), strict=True):
    row["95% CI"] = summary.ci_cell(st.rewards)
  print(summary.format_table(rows, ["phase", "mean reward", "95% CI", "n", "infra errors"],
                             title="== held-out reward before/after RL =="))
  stage_rows = []
  for step_rec in hist:
    st = step_rec.get("stage")
    if st is not None and (not stage_rows or stage_rows[-1]["stage"] != str(int(st))):
      stage_rows.append({"stage": str(int(st)), "first step": str(step_rec.get("step")),
                         "steps": 0, "_r": []})
    if st is not None:
      stage_rows[-1]["steps"] += 1
      if "reward/mean" in step_rec:
        stage_rows[-1]["_r"].append(float(step_rec["reward/mean"]))
  for r in stage_rows:  # Batch reward over each stage's first and last quarter of batches.
    rs = r.pop("_r")
    q = max(1, len(rs) // 4)
    r.update({"steps": str(r["steps"]), "reward first": summary.mean_std(rs[:q])[0],
              "reward last": summary.mean_std(rs[-q:])[0]})
  if stage_rows:
    print(summary.format_table(stage_rows, title="== RL reward per stage (trainer batches) =="))
  used = {k.removeprefix("stream/"): v for k, v in last.items()
          if k.startswith(("stream/trajectories", "stream/time_limited", "stream/dropped",
                           "stream/zero", "stream/groups",
                           "trajectories_per", "utilisation", "policy_version"))}
  if hist:  # Trainer tokens/s over the whole RL phase.
    tok = sum(float(h.get("tokens", 0.0)) for h in hist)
    span = float(hist[-1].get("wall_s", 0.0)) or sum(float(h.get("step_s", 0.0)) for h in hist)
    used["trainer tokens/s"] = tok / span if span else float("nan")
  print(summary.format_table([used], title="== RL trainer (last step) ==") if used else
        "(RL trainer wrote no metrics.jsonl)")
  series = {"RL rollouts (by policy version)": [
      (float(v), summary.mean_std(r)[0]) for v, r in sorted(rl_stream.by_version.items())
      if v >= 0]}
  trainer_pts = [(float(h["step"]), float(h["reward/mean"])) for h in hist if "reward/mean" in h]
  if trainer_pts:
    series["trainer batch reward (by step)"] = trainer_pts
  png = summary.plot_rewards(
      series, os.path.join(workdir, "reward.png"),
      marks={"held-out after SFT": ev_sft.mean, "held-out after RL": ev_rl.mean},
      stage_starts=[(float(r["first step"]), f"stage {int(r['stage'])}") for r in stage_rows])
  print(f"reward plot: {png}")
  return {"heldout_sft": ev_sft.mean, "heldout_rl": ev_rl.mean,
          "heldout_sft_n": len(ev_sft.rewards), "heldout_rl_n": len(ev_rl.rewards),
          "rl_rollouts": len(rl_stream.rewards),
          "rl_rollout_mean": rl_stream.mean, "rl_trainer_last": last, "plot": png}
