"""The whole KLong pipeline on a 2-core CPU box: `make demo` and `launch/local.py` read this.

  python -m klong_jax.demo --workdir=runs/demo [--config=configs/demo.py:seed=1]
  python launch/local.py --config=configs/demo.py --workdir=runs/demo_rl [--dry_run]

Sections: tasks, tokenizer, distill (scripted teacher), sft, eval (held-out), rl (progressive
stages; trainer + server + workers as separate processes), server, workers, export, budgets_s
(expected seconds per phase, for the ETA line). What a role's own config file takes is a nested
section, never a "k=v" string: `*.args` is that file's arg string (rendered `k=v,...` at launch),
`sft.overrides` / `rl.overrides` / `model_overrides` are `--config.SECTION.FIELD` overrides of the
trainer (and server/export) configs, e.g. `c.rl.overrides.optim.lr`. Arg string: `seed=N`,
`runlocal` (CI-sized: a few tasks, a few steps, local sandbox backend), `backend=docker|local`,
`wide` (hidden 128, 4 layers: better SFT on the earlier suite, 1.6x slower SFT; not re-measured
since params.json).

Measured (2 shared cores, docker sandboxes): a teacher trajectory is ~650 tokens (~470 of them
the fixed prefix) with the domain tokenizer; phases ~2-2.5 min distill, ~5 min SFT (250 steps),
~2.3-4 min per held-out eval (60 rollouts), ~6-10 min RL (144 rollouts), ~0.4 min export:
18-25 min. Held-out reward after SFT vs after RL (3 seeds): README "Where the demo stands".
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo experiment; see the module docstring for the arg string."""
  args = common.parse_arg(arg, seed=0, runlocal=False, backend="docker", wide=False,
                          suite="")
  c = ml_collections.ConfigDict()
  c.name = "klong-demo"
  c.seed = args.seed
  c.python = ""                     # Interpreter for role processes; "" = this one.
  c.backend = args.backend          # Sandbox backend for distill, eval and RL workers.
  # Fake CPU devices for every JAX process of the demo: 1 keeps the tiny batches unsharded
  # (8, as `make test` uses, would force batch sizes that are multiples of 8 on 2 cores).
  c.xla_flags = "--xla_force_host_platform_device_count=1"
  c.stop_after = ""                 # "" = every phase; else stop after sft|eval_sft|eval_rl.

  c.tasks = ml_collections.ConfigDict()
  # "long": the long-horizon sweeps (tasks/long_suite.py: ~19 actions, trajectories several
  # contexts long); "short": the 2-action mini-papers (the CI smoke, `runlocal`).
  c.tasks.suite = args.suite or ("short" if args.runlocal else "long")
  c.tasks.root = ""                 # "" = the bundled suite named by tasks.suite.
  c.tasks.max_train = 0             # 0 = every train-split task.
  # RL tasks: "rl" = fresh parameter sets of the train families (papers the SFT data never
  # showed, like held-out), "train" = RL on the distilled tasks.
  c.tasks.rl_split = "rl"
  c.tasks.max_rl = 0                # 0 = every task of rl_split.
  c.tasks.max_heldout = 0           # 0 = every held-out task.

  c.tokenizer = ml_collections.ConfigDict()
  # Domain-adapted (bundled corpus + train papers, system prompt, tool schemas, teacher
  # scripts; pieces up to 64 chars): the held-out prompt prefix drops from ~2.2k tokens (generic,
  # vocab 512) to ~360, so a whole teacher trajectory fits one 1024-token row.
  c.tokenizer.vocab_size = 2048
  c.tokenizer.domain = True
  c.tokenizer.repeat = 20           # Copies of each fixed string in the tokenizer corpus.
  c.tokenizer.max_piece_length = 64
  # Overrides of every JAX role's config (SFT, RL trainer, servers, export): the model must
  # match the tokenizer's vocab.
  c.model_overrides = ml_collections.ConfigDict({"model": {"vocab_size": 2048}})

  # The one context policy (data/context.py) of every role: the agent's context window in
  # distillation, eval and RL rollouts IS the trainer's chunk (max_len), with the same overlap and
  # reply budget, so every action is trained on the context it was taken under.
  c.context = ml_collections.ConfigDict()
  c.context.max_len = 1024
  c.context.overlap = 96
  c.context.completion_tokens = 160  # The longest teacher action (the method) is ~100 tokens.

  c.distill = ml_collections.ConfigDict()
  c.distill.teacher_skill = 0.8     # < 1: the teacher makes task-relevant mistakes.
  # Per-kind rates overriding (1 - skill) / 2. The teacher forgets reproduce.sh in half its
  # episodes (PaperBench's commonest failure: the grader re-runs reproduce.sh in a fresh
  # container, so the results leaves score 0 and the trajectory 0.25): SFT imitates it, and RL,
  # whose groups score 1.0 vs 0.25 on it, must learn to always write reproduce.sh. "" = the
  # rates of `teacher_skill` alone (README "Where the demo stands" has both measured).
  c.distill.teacher_mistakes = "no_reproduce=0.5"
  # 1 episode on each of the 60 train tasks (6 papers per family); 57-59 kept, ~2-2.5 min.
  c.distill.episodes_per_task = 1
  # Keep every trajectory that wrote the solution (>= 0.25, the Code Development leaves): the
  # teacher's partial-credit episodes are SFT data (real teachers score well below 1 on
  # PaperBench) and what RL improves on.
  c.distill.threshold = 0.2
  c.distill.time_limit_s = 300.0
  c.distill.max_steps = 40          # A sweep takes the teacher ~19 actions.

  c.sft = ml_collections.ConfigDict()
  c.sft.config = "configs/sft_tiny.py"
  c.sft.args = ml_collections.ConfigDict()  # Arg string of sft.config.
  c.sft.args.steps = 250             # ~2 s/step: long enough that held-out outputs parse.
  # --config.SECTION.FIELD overrides of the SFT trainer (data.shards/tokenizer are set by the
  # demo). With the domain tokenizer a teacher trajectory is ~0.5k tokens: one chunk, unsplit.
  # data.max_len / overlap / completion_tokens come from `context`.
  c.sft.overrides = ml_collections.ConfigDict({
      "data": {"row_len": 1024, "batch_size": 4},
      "optim": {"warmup_steps": 5},
      "checkpoint": {"every": 50}})

  c.server = ml_collections.ConfigDict()
  c.server.config = "configs/serve_tiny.py"
  c.server.args = ml_collections.ConfigDict(dict(max_batch=8, max_len=2048))  # server.config's.
  c.server.model_name = "klong-demo"  # Served name; workers and the chat request use it.
  c.server.port = 0                 # 0 = pick a free port at launch.
  c.server.ready_timeout_s = 300.0

  c.workers = ml_collections.ConfigDict()
  c.workers.num = 2                 # Worker processes (>= 2 for the demo).
  c.workers.group_size = 4          # Rollouts per task per group (the RL group).
  c.workers.rounds = 1000           # Passes over the task list; the launcher stops them.
  # Per-round task order seed (-1: directory order). The workers deal tasks round-robin over
  # their families (rollout/task_sampling.py, --interleave_families, on by default), each family's
  # tasks and the family order shuffled by this seed: in directory order a demo RL run saw 5 of
  # the 10 families (issue #31). Every window of 10 groups covers the 10 families.
  c.workers.shuffle_seed = 0
  c.workers.max_steps = 40
  c.workers.time_limit_s = 60.0     # Used before the trainer writes control.json.
  # Clock of the time limits (RL stages, eval), reminders and statuses: "tokens" (deterministic,
  # agent/budget.py: the same cuts on an idle or a loaded box) or "wall" (pods). Rates: seconds
  # per uncached prefill / generated token, tool calls by the fixed table (bit-reproducible;
  # "cpu" charges the sandbox's CPU time). Both clocks are recorded in every trajectory.
  c.workers.budget_clock = "tokens"
  c.workers.prefill_s_per_token = 0.0005  # Token clock: s per prefill token not reused.
  c.workers.decode_s_per_token = 0.01     # Token clock: s per generated token.
  c.workers.tool_cost = "table"           # Token clock: tools by "table" or sandbox "cpu" time.
  c.workers.tool_costs = (  # Token clock: per-tool seconds NAME=S,... (default: the rest).
      "bash=0.5,python=0.5,read_file_chunk=0.1,search_file=0.1,submit=0,default=0.1")
  # Token clock: the outer wall guard (hang guard) is this x the wall clock's (time_limit_s x 1.5
  # + 60 s): 4 cut 15 s-stage episodes at ~350 s on a box at load 22 (8 episodes, one server).
  c.workers.hang_factor = 20.0
  c.workers.reproduce_timeout_s = 30.0
  c.workers.ckpt_every_s = 600.0    # Episode checkpoint interval, agent seconds (0 = none).
  # Sampling temperature of the RL rollouts; the trainer's rl.temperature is set to it. At 1.0
  # the tiny policy garbles long code (held-out reward 0.11 after SFT, seed 0); at 0.6 it is
  # 0.31 and RL groups have reward spread to learn from.
  c.workers.temperature = 0.6
  # Judge endpoint for rubric leaves without a programmatic check ("" = none; the bundled tasks
  # are fully programmatic). Key from $KLONG_JUDGE_API_KEY.
  c.workers.judge_url = ""
  c.workers.judge_model = "judge"

  c.eval = ml_collections.ConfigDict()
  # Rollouts per held-out task per evaluation: 60 in all, so the standard error of a mean
  # (rewards are bimodal, ~0.33 or 1.0) is ~0.045 rather than ~0.06.
  c.eval.episodes_per_task = 6
  c.eval.time_limit_s = 120.0       # Above the last RL stage's limit (the paper: 12 h vs 6 h).
  c.eval.max_steps = 40
  c.eval.timeout_s = 900.0
  c.eval.temperature = 0.6          # Held-out sampling temperature (same for SFT and RL).
  # Task sets each eval phase scores, comma-separated: heldout, rl (the RL tasks: did RL optimise
  # what it trained on, apart from whether it generalised). The ablation evaluates both.
  c.eval.sets = "heldout"
  # > 0: episodes per task set (per task = ceil(episodes / tasks), the same for every task and
  # arm, so arms pair episode by episode); 0 = eval.episodes_per_task per task.
  c.eval.episodes = 0
  c.eval.workers = 0                # Worker processes of an eval (0 = workers.num).

  c.rl = ml_collections.ConfigDict()
  c.rl.config = "configs/rl_tiny.py"
  # Arg string of rl.config: 3 stages of 3 steps (stage time limits 20 s, 40 s, 60 s: rl_tiny's
  # default `limits`); a step = one element of 4 groups x 4 rollouts, trained in
  # ceil(loss rows / 8) updates of 8 packed rows (2 for most elements), a version published per
  # step. docs/results.md has the variants measured.
  # off_policy: rl_tiny's rl.off_policy ("none" | "decoupled"), here so the command line can
  # set it (--config.rl.args.off_policy=decoupled).
  c.rl.args = ml_collections.ConfigDict(dict(
      steps=9, stage_steps=3, batch=16, groups=4, staleness=2, publish=1, minibatches=2,
      off_policy="none"))
  # MoE routing replay (R3): workers record each token's expert ids, the trainer replays them.
  c.rl.routing_replay = True
  c.rl.mode = "async"               # async | sync (the baseline).
  # --config.SECTION.FIELD overrides of the RL trainer (its own config owns stages and steps).
  # lr 2e-4 (per-step KL 0.001-0.016 with the per-token KL clamp); 3e-4 and 1e-3 gave KL spikes
  # (> 0.5 within a stage) and collapsing batch rewards on the earlier suite.
  c.rl.overrides = ml_collections.ConfigDict({"data": {"row_len": 1024}, "optim": {"lr": 2e-4}})
  c.rl.timeout_s = 900.0            # Wall-clock cap on the whole RL phase.

  c.export = ml_collections.ConfigDict()
  c.export.bf16 = False
  c.export.prompt = "Write reproduce.sh for a paper whose solution is solution.py."

  c.budgets_s = ml_collections.ConfigDict(dict(
      tokenizer=2, distill=125, sft=290, eval_sft=170, rl=420, eval_rl=170, export=30,
      summary=5))

  if args.wide:  # Earlier suite: SFT 0.342 vs 0.286 (seed 0), 24 min; 1.6x slower SFT steps.
    c.model_overrides.model.update(dict(hidden_size=128, num_layers=4, head_dim=32,
                                        intermediate_size=256, moe_intermediate_size=64))
    c.sft.args.steps = 200           # Loss 0.09 at 200 (tiny: 0.21 at 250).
    c.budgets_s.update(dict(sft=380, eval_sft=180, rl=590, eval_rl=190))

  if c.tasks.suite == "long":  # ~19 actions per rollout: fewer, longer rollouts; limits that bind.
    c.eval.episodes_per_task = 2    # 20 held-out rollouts per evaluation.
    # Held-out episodes end on the step budget (40 actions), never on the clock: a wall-clock
    # limit makes the held-out reward depend on machine load (measured: 120 s cut episodes of a
    # CPU-starved run at ~10 actions). The phase cap is a hang guard, well above a loaded run.
    c.eval.time_limit_s = 900.0
    c.eval.timeout_s = 3600.0
    # Stage limits 15 s / 30 s / 60 s against ~20-30 s full student episodes on 2 cores: stage 1
    # cuts most rollouts part way (graded as they stand), the last lets them finish.
    # Every family in every stage (issue #31): a stage is 2 steps x 5 groups = 10 groups, one per
    # RL family (the workers restart their family cycle at each stage: task_sampling.StageCycle;
    # tests/rollout/test_stage_coverage.py). Groups of 2 (RLOO with 2 samples) keep the rollouts
    # near the earlier 2 steps x 2 groups x 4 (20 vs 16 per stage); 5 workers (10 episodes in
    # flight, 8 before) make one step's 5 groups at once, and sync mode (one group per worker
    # and policy version) needs workers >= groups per step. Groups of 4 would be 40 rollouts
    # per stage (2.5x the RL phase).
    c.workers.group_size = 2
    c.workers.num = 5
    c.rl.args = ml_collections.ConfigDict(dict(
        steps=6, stage_steps=2, batch=16, groups=5, staleness=2, publish=1, minibatches=2,
        limits="15:30:60", off_policy="none"))
    c.rl.timeout_s = 2400.0
    c.budgets_s.update(dict(distill=185, sft=410, eval_sft=300, rl=600, eval_rl=300))

  if c.tasks.suite == "short":  # The 2-action mini-papers: one chunk per trajectory.
    c.distill.time_limit_s = 60.0
    c.distill.max_steps = 4         # The teacher needs 2-3 (read/solve, submit).
    c.workers.max_steps = 4
    c.eval.max_steps = 4
    c.eval.time_limit_s = 60.0
    c.context.completion_tokens = 256

  if args.runlocal:
    c.backend = "local" if args.backend == "docker" else args.backend
    c.tasks.max_train = 2
    c.tasks.max_rl = 2
    c.tasks.max_heldout = 1
    c.distill.episodes_per_task = 1
    c.distill.teacher_skill = 1.0
    c.distill.teacher_mistakes = ""
    c.sft.args = ml_collections.ConfigDict(dict(steps=4))
    c.sft.overrides = ml_collections.ConfigDict({
        "optim": {"warmup_steps": 1},
        "checkpoint": {"every": 2},
        "data": {"row_len": 1024, "batch_size": 1}})
    c.server.args = ml_collections.ConfigDict(dict(max_batch=2, max_len=2048))
    c.context.completion_tokens = 64
    c.workers.group_size = 2
    c.workers.max_steps = 2
    c.eval.episodes_per_task = 1
    c.eval.max_steps = 2
    c.rl.args = ml_collections.ConfigDict(dict(runlocal=True, steps=6, stage_steps=3,
                                               off_policy="none"))
    c.budgets_s = ml_collections.ConfigDict(dict(
        tokenizer=1, distill=10, sft=30, eval_sft=20, rl=40, eval_rl=20, export=15, summary=2))
  return c
