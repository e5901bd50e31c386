"""The eval loads PaperBench's own task folders unchanged: five real rubrics with their configs and
blacklists, the folder/id mismatch, `none` blacklists, and a valid Code-Dev reduction of each."""

import os
import shutil

import pytest

from klong_jax.eval.runner import EvalError, load_eval_tasks
from klong_jax.grading.rubric import code_dev_only, grade_tree, rubric_from_dict
from tests import refdata

PB = str(refdata.PAPERBENCH)
PAPERS = f"{PB}/papers"
RUBRIC_PAPERS = sorted(d for d in os.listdir(PAPERS)
                       if os.path.exists(os.path.join(PAPERS, d, "rubric.json")))


def test_five_real_rubric_papers_present():
  assert len(RUBRIC_PAPERS) == 5


def test_a_paper_without_rubric_is_a_clear_error():
  with pytest.raises(EvalError, match=r"'lbcs'.*no rubric.json.*--task_ids"):
    load_eval_tasks(PAPERS)


@pytest.mark.parametrize("variant", ["full", "code_dev"])
def test_real_papers_load_with_configs_and_blacklists(variant):
  tasks = load_eval_tasks(PAPERS, RUBRIC_PAPERS, variant)
  by_dir = {os.path.basename(t.path): t for t in tasks}
  assert sorted(by_dir) == RUBRIC_PAPERS
  # config.yaml's id wins over the folder name (PaperBench's own quirk).
  assert by_dir["stochastic-interpolants"].id == "stochastic-interpolant"
  assert by_dir["semantic-self-consistency"].blacklist == []  # the 4 bytes "none"
  for t in tasks:
    raw = open(os.path.join(t.path, "blacklist.txt")).read().strip()
    assert (raw == "none") == (t.blacklist == []), t.id
    assert all(line.strip() in raw for line in t.blacklist)
    assert t.title  # config.yaml was read


@pytest.mark.parametrize("paper", RUBRIC_PAPERS)
def test_code_dev_reduction_of_each_real_rubric_is_valid(paper):
  (task,) = load_eval_tasks(PAPERS, [paper], "code_dev")
  full, cd = task.rubric, code_dev_only(task.rubric)
  again = rubric_from_dict(cd.to_dict())  # a valid PaperBench tree
  assert again == cd
  leaves = list(cd.leaves())
  assert leaves and all(leaf.task_category == "Code Development" for leaf in leaves)
  full_cd = [leaf.id for leaf in full.leaves() if leaf.task_category == "Code Development"]
  assert [leaf.id for leaf in leaves] == full_cd  # exactly the Code Development leaves, in order
  assert all(n.sub_tasks for n in cd.walk() if n.task_category is None)  # no emptied subtrees
  assert grade_tree(cd, lambda n: (1.0, True, "", None)).score == pytest.approx(1.0)


def test_ids_match_folder_or_config_id_and_unknown_ids_fail(tmp_path):
  by_id = load_eval_tasks(PAPERS, ["stochastic-interpolant"])
  by_dir = load_eval_tasks(PAPERS, ["stochastic-interpolants"])
  assert [t.path for t in by_id] == [t.path for t in by_dir]
  with pytest.raises(EvalError, match="not found"):
    load_eval_tasks(PAPERS, ["no-such-paper"])


def test_duplicate_task_ids_are_an_error(tmp_path):
  for name in ("a", "b"):
    shutil.copytree(os.path.join(PAPERS, "semantic-self-consistency"), tmp_path / name)
  with pytest.raises(EvalError, match="share the id"):
    load_eval_tasks(str(tmp_path))


def test_split_and_max_tasks_select_bundled_heldout_tasks():
  from klong_jax.tasks import bundled_tasks_dir
  tasks = load_eval_tasks(bundled_tasks_dir(), split="heldout", max_tasks=3)
  assert len(tasks) == 3 and all(t.split == "heldout" for t in tasks)
