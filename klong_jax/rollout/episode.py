"""Pieces of one agent episode shared by the rollout worker and the eval runner (no absl flags).

`prepare_sandbox` lays the task out for the agent, `run_guarded` runs the scaffold under the
outer wall-clock guard, `agent_commands` collects tool-call arguments for the blacklist scan.
"""

from __future__ import annotations

import threading
from typing import Any

from klong_jax.agent import scaffold
from klong_jax.agent.tools import TOOLS
from klong_jax.sandbox import base as sandbox_lib


def task_files(task: Any) -> dict[str, bytes]:
  """The files an agent sees: paper/{paper.md, addendum.md, blacklist.txt} plus starter files."""
  files = {"paper/paper.md": (task.paper_md or "").encode(),
           "paper/addendum.md": (task.addendum_md or "").encode(),
           "paper/blacklist.txt": "\n".join(task.blacklist or []).encode()}
  files.update(getattr(task, "files", None) or {})
  return files


def agent_commands(messages: list[dict[str, Any]]) -> list[str]:
  """Every tool-call argument string, for the blacklist scan."""
  return [str((c.get("function") or {}).get("arguments", ""))
          for m in messages for c in (m.get("tool_calls") or [])]


def prepare_sandbox(sb: Any, task: Any) -> None:
  """Puts the task files in the sandbox and creates the (empty) submission directory."""
  sb.put_files(task_files(task))
  sb.exec(f"mkdir -p {sandbox_lib.SUBMISSION}", timeout_s=30)


def run_guarded(client: Any, sb: Any, prefix: list[dict[str, Any]], acfg: scaffold.AgentConfig,
                wall_s: float, state: dict[str, Any] | None = None,
                fmt: Any = None, parser: Any = None, resume: scaffold.EpisodeState | None = None,
                on_step: Any = None) -> scaffold.EpisodeResult:
  """Runs the scaffold; after `wall_s` the outer guard stops it and interrupts running commands
  (the episode then ends as wall_timeout and is still graded). `fmt`: the served model's chat
  format, for the shared context policy (scaffold.run_episode); `parser`: its tool-call family's
  parser (data/tool_parsers.py), for tool-call text an endpoint left unparsed. `resume` and
  `on_step`: episode checkpoints (scaffold.run_episode, rollout/episode_ckpt.py)."""
  stop = threading.Event()

  def guard() -> None:
    stop.set()
    interrupt = getattr(sb, "interrupt", None)
    if interrupt is not None:
      interrupt()

  timer = threading.Timer(wall_s, guard)
  timer.daemon = True
  timer.start()
  try:
    return scaffold.run_episode(client, sb, prefix, acfg, tools=TOOLS, should_stop=stop.is_set,
                                state=state, fmt=fmt, parser=parser, resume=resume,
                                on_step=on_step)
  finally:
    timer.cancel()
