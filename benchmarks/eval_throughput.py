"""Eval throughput: one N-episode held-out eval of a demo run's SFT policy per worker count
(server + workers + docker sandboxes, as the demo and the ablation run it).

  python -m benchmarks.eval_throughput --run=runs/demo [--episodes=100] [--bench_workers=2,4]
      [--minutes=0]

`--run` is a `klong_jax.demo` workdir whose SFT phase finished. Writes
benchmarks/results/eval_throughput.json: seconds, episodes/min and mean reward per worker count,
and each count's episodes/min as a ratio to the first count's (the baseline, measured in the
same run). `--minutes` > 0 stops each eval after that long (episodes in flight are lost, so the
rate is a slight underestimate) and extrapolates the time of the full `--episodes`. Wall times
depend on the box's load: the load average is recorded beside them.
"""

import glob
import os
import shutil
import time

from absl import app, flags

from benchmarks._results import write_json

_RUN = flags.DEFINE_string("run", None, "Demo workdir with a finished SFT phase.")
_EPISODES = flags.DEFINE_integer("episodes", 100, "Episodes per eval (spread over the tasks).")
_WORKERS = flags.DEFINE_list("bench_workers", ["2", "4"], "Eval worker counts; first = baseline.")
_CONFIG_ARG = flags.DEFINE_string("config_arg", "", "Arg string of configs/demo.py.")
_MINUTES = flags.DEFINE_float("minutes", 0.0, "Stop each eval after this long (0 = finish).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/eval_throughput.json", "Result file.")


def _policy(c, run: str) -> str:
  """The run's SFT policy dir (published as the demo's eval_sft phase does, if missing)."""
  policy = os.path.join(run, "eval_sft", "policy")
  if not os.path.isdir(os.path.join(policy, "0")):
    from klong_jax import config_util
    from klong_jax.train import policy as sft_policy
    cfg = config_util.load_config(c.sft.config, config_util.format_arg(c.sft.args), {
        **config_util.overrides_dict(c.model_overrides),
        **config_util.overrides_dict(c.sft.overrides)})
    cfg.seed = c.seed
    sft_policy.publish_sft_policy(cfg, os.path.join(run, "sft", "checkpoints"), policy, 0)
  return policy


def main(argv):
  del argv
  from configs import demo as demo_config
  from klong_jax.demo import pipeline

  run = os.path.abspath(_RUN.value or "")
  if not os.path.exists(os.path.join(run, "sft", "done")):
    raise app.UsageError(f"--run={_RUN.value}: no finished SFT phase there (sft/done); run "
                         "python -m klong_jax.demo --config.stop_after=sft first")
  c = demo_config.get_config(_CONFIG_ARG.value)
  os.environ["XLA_FLAGS"] = c.xla_flags
  c.eval.episodes = _EPISODES.value
  toks = glob.glob(os.path.join(run, "tokenizer", "**", "tokenizer.model"), recursive=True)
  heldout = os.path.join(run, "tasks", "heldout")
  policy = _policy(c, run)
  res = {"episodes_target": _EPISODES.value, "tasks": len(os.listdir(heldout)),
         "episodes_per_task": pipeline.episodes_per_task(c, heldout), "runs": {}}
  base = None
  from klong_jax.demo import rewards
  from klong_jax.launch import procs
  if _MINUTES.value > 0:
    c.eval.timeout_s = 60.0 * _MINUTES.value
  for w in (int(x) for x in _WORKERS.value):
    c.eval.workers = w
    out = os.path.join(run, "bench_eval", f"w{w}")
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    t = time.time()
    try:
      pipeline._evaluate(c, out, policy, toks[0], heldout)  # noqa: SLF001
      finished = True
    except procs.RoleError:
      if _MINUTES.value <= 0:
        raise
      finished = False
    dt = time.time() - t
    stats = rewards.read_rewards(os.path.join(out, "stream"))
    trajs = list(rewards.iter_trajectories(os.path.join(out, "stream")))
    ep_s = [float(t.timings["total_s"]) for t in trajs if "total_s" in t.timings]
    turns = [sum(m.get("role") == "assistant" for m in t.messages) for t in trajs]
    rate = 60 * len(stats.rewards) / dt
    base = base or rate
    res["runs"][str(w)] = {"seconds": dt, "finished": finished, "episodes": len(stats.rewards),
                           "infra_errors": stats.infra_errors, "episodes_per_min": rate,
                           "minutes_for_target": _EPISODES.value / rate if rate else None,
                           "mean_reward": stats.mean,
                           "rate_vs_first": rate / base if base else None,
                           "load_avg_start": load0, "load_avg_end": os.getloadavg()[0],
                           # Not biased by the episodes a --minutes cut loses: w / episode time.
                           "episode_s_mean": sum(ep_s) / len(ep_s) if ep_s else None,
                           "steady_episodes_per_min": 60 * w * len(ep_s) / sum(ep_s)
                           if ep_s else None,
                           "turns_mean": sum(turns) / len(turns) if turns else None}
    print(f"{w} workers: {len(stats.rewards)} episodes in {dt:.0f} s ({rate:.2f}/min; "
          f"{_EPISODES.value} would take {_EPISODES.value / rate if rate else float('nan'):.0f} "
          f"min), mean reward {stats.mean:.3f}", flush=True)
  write_json(_OUT.value, res)


if __name__ == "__main__":
  app.run(main)
