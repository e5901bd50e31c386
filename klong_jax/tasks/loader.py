"""Task directories in PaperBench's layout (also our bundled/factory format): load and list them.

A task dir holds `paper.md`, `addendum.md`, optional `judge.addendum.md`, `blacklist.txt` (`none`
means empty), `config.yaml` (its `id` may differ from the folder name) and `rubric.json`; our
bundled tasks may add `files/` (starter files copied into the agent's workspace).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from klong_jax.grading.rubric import RubricNode, load_rubric

SPLITS = ("train", "rl", "heldout")


class TaskError(ValueError):
  """A task directory that cannot be loaded; the message names the dir and the fix."""


@dataclasses.dataclass
class Task:
  """One paper task, as the agent, the grader and the eval runner see it."""

  id: str
  title: str
  paper_md: str
  addendum_md: str
  judge_addendum_md: str
  rubric: RubricNode | None
  blacklist: list[str]
  config: dict[str, Any]
  files: dict[str, bytes]
  path: str

  @property
  def split(self) -> str:
    return str(self.config.get("split", "train"))


def parse_blacklist(text: str) -> list[str]:
  """PaperBench monitor rules: drop blank and `#` lines; a lone `none` means no entries."""
  lines = [ln.strip() for ln in text.splitlines()]
  lines = [ln for ln in lines if ln and not ln.startswith("#")]
  return [] if [ln.lower() for ln in lines] == ["none"] else lines


def _read(path: str, default: str | None = None) -> str:
  if not os.path.exists(path):
    if default is None:
      raise TaskError(f"task file {path} is missing")
    return default
  with open(path, encoding="utf-8") as f:
    return f.read()


def load_task(task_dir: str, require_rubric: bool = True) -> Task:
  """Loads one task dir; the task id comes from config.yaml (falling back to the folder name)."""
  task_dir = os.path.abspath(task_dir)
  if not os.path.isdir(task_dir):
    raise TaskError(f"task dir {task_dir} does not exist")
  cfg_text = _read(os.path.join(task_dir, "config.yaml"), "")
  try:
    config = yaml.safe_load(cfg_text) or {}
  except yaml.YAMLError as e:
    raise TaskError(f"{task_dir}/config.yaml is not valid YAML ({e})") from None
  if not isinstance(config, dict):
    raise TaskError(f"{task_dir}/config.yaml must be a mapping, got {type(config).__name__}")
  split = config.get("split", "train")
  if split not in SPLITS:
    raise TaskError(f"{task_dir}/config.yaml: split {split!r} must be one of {SPLITS}")
  rubric_path = os.path.join(task_dir, "rubric.json")
  if os.path.exists(rubric_path):
    rubric = load_rubric(rubric_path)
  elif require_rubric:
    raise TaskError(f"task {task_dir} has no rubric.json (pass require_rubric=False to allow)")
  else:
    rubric = None
  files: dict[str, bytes] = {}
  files_root = os.path.join(task_dir, "files")
  for dirpath, _, names in os.walk(files_root):
    for name in sorted(names):
      full = os.path.join(dirpath, name)
      with open(full, "rb") as f:
        files[os.path.relpath(full, files_root)] = f.read()
  return Task(
      id=str(config.get("id") or os.path.basename(task_dir)),
      title=str(config.get("title") or ""),
      paper_md=_read(os.path.join(task_dir, "paper.md"), ""),
      addendum_md=_read(os.path.join(task_dir, "addendum.md"), ""),
      judge_addendum_md=_read(os.path.join(task_dir, "judge.addendum.md"), ""),
      rubric=rubric,
      blacklist=parse_blacklist(_read(os.path.join(task_dir, "blacklist.txt"), "")),
      config=config, files=files, path=task_dir)


def list_tasks(root: str, split: str | None = None) -> list[str]:
  """Sorted task dirs under `root` (with a config.yaml or rubric.json), optionally by split."""
  if not os.path.isdir(root):
    raise TaskError(f"tasks root {root} does not exist")
  out = []
  for name in sorted(os.listdir(root)):
    d = os.path.join(root, name)
    if not os.path.isdir(d) or not any(
        os.path.exists(os.path.join(d, f)) for f in ("config.yaml", "rubric.json")):
      continue
    if split is not None:
      if split not in SPLITS:
        raise TaskError(f"split {split!r} must be one of {SPLITS}")
      cfg = yaml.safe_load(_read(os.path.join(d, "config.yaml"), "")) or {}
      if cfg.get("split", "train") != split:
        continue
    out.append(d)
  return out


def bundled_tasks_dir() -> str:
  """The offline mini-paper suite shipped with the package."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
