"""Task loading: PaperBench layout quirks, the bundled suite, its split and its generator."""

import filecmp
import glob
import json
import os

import pytest

from klong_jax.grading.rubric import CATEGORIES
from klong_jax.tasks import (
  TaskError,
  build_suite,
  bundled_tasks_dir,
  list_tasks,
  load_task,
  parse_blacklist,
)
from klong_jax.tasks.families import FAMILIES, RL_SETS, TRAIN_SETS, fresh_params
from tests import refdata

PB = str(refdata.PAPERBENCH_PAPERS)


def test_parse_blacklist():
  assert parse_blacklist("none") == []
  assert parse_blacklist("\n# c\nhttps://a/b\n\nhttps://c/d") == ["https://a/b", "https://c/d"]


@pytest.mark.parametrize("d", sorted(glob.glob(f"{PB}/*")))
def test_paperbench_layout_loads(d):
  t = load_task(d, require_rubric=False)
  name = os.path.basename(d)
  assert t.id == {"stochastic-interpolants": "stochastic-interpolant"}.get(name, name)
  assert t.title
  if name == "semantic-self-consistency":
    assert t.blacklist == []
  else:
    assert len(t.blacklist) == 1 and t.blacklist[0].startswith("https://github.com/")
  if name == "lbcs":
    assert t.rubric is None and len(t.addendum_md) > 1000
    with pytest.raises(TaskError, match="no rubric.json"):
      load_task(d)
  else:
    assert sum(1 for _ in t.rubric.leaves()) > 50


def test_bundled_suite_shape():
  dirs = list_tasks(bundled_tasks_dir())
  assert len(dirs) >= 20
  train = list_tasks(bundled_tasks_dir(), split="train")
  held = list_tasks(bundled_tasks_dir(), split="heldout")
  rl = list_tasks(bundled_tasks_dir(), split="rl")
  assert len(train) + len(rl) + len(held) == len(dirs) and len(held) >= 5
  assert len(rl) == RL_SETS * len(FAMILIES)
  assert len(train) == sum(len(f.params) - 1 + TRAIN_SETS for f in FAMILIES)
  fam_train = {load_task(d).config["family"] for d in train}
  fam_held = {load_task(d).config["family"] for d in held}
  assert fam_held <= fam_train == {f.name for f in FAMILIES}
  # RL tasks are new parameter sets of the train families: no paper equals a train/held-out one
  # up to its task id, so a policy can only earn their results by reading the paper.
  def setup(d):
    return load_task(d).paper_md.split("## Experimental setup")[1].split("## Reproduction")[0]
  # Every setup is distinct across all splits: no train paper repeats a held-out or RL one.
  setups = [setup(d) for d in train + held + rl]
  assert len(set(setups)) == len(setups)
  ids = set()
  for d in dirs:
    t = load_task(d)
    ids.add(t.id)
    leaves = list(t.rubric.leaves())
    assert all(lf.check is not None for lf in leaves)
    assert {lf.task_category for lf in leaves} == set(CATEGORIES)
    assert len({lf.weight for lf in leaves}) > 1
    assert t.blacklist and t.paper_md.startswith("# ") and t.addendum_md
  assert len(ids) == len(dirs)


def test_bundled_suite_matches_generator(tmp_path):
  build_suite.build(str(tmp_path))
  ours = bundled_tasks_dir()
  assert sorted(os.listdir(tmp_path)) == sorted(
      n for n in os.listdir(ours) if os.path.isdir(os.path.join(ours, n)))
  for dirpath, _, names in os.walk(tmp_path):
    for f in names:
      rel = os.path.relpath(os.path.join(dirpath, f), tmp_path)
      assert filecmp.cmp(tmp_path / rel, os.path.join(ours, rel), shallow=False), (
          f"{rel} is stale: run python -m klong_jax.tasks.build_suite")
  t = load_task(os.path.join(ours, "arith-3"))  # The parameters ship as a starter file.
  assert json.loads(t.files["submission/params.json"]) == {"a": 7, "d": -3, "n": 12}


def test_bad_task_dirs(tmp_path):
  with pytest.raises(TaskError, match="does not exist"):
    load_task(str(tmp_path / "nope"))
  (tmp_path / "config.yaml").write_text("split: validation\n")
  with pytest.raises(TaskError, match="split"):
    load_task(str(tmp_path))
  (tmp_path / "config.yaml").write_text("id: x\n")
  (tmp_path / "files").mkdir()
  (tmp_path / "files" / "data.csv").write_text("1,2\n")
  t = load_task(str(tmp_path), require_rubric=False)
  assert t.id == "x" and t.files == {"data.csv": b"1,2\n"} and t.split == "train"


def test_fresh_params_are_valid_new_and_deterministic():
  for f in FAMILIES:
    sets = fresh_params(f, 4, seed=1)
    assert sets == fresh_params(f, 4, seed=1) and sets != fresh_params(f, 4, seed=2)
    assert all(p not in f.params for p in sets) and len({repr(p) for p in sets}) == 4
    assert all(set(p) == set(f.params[0]) for p in sets)
