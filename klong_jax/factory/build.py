"""Task build: an LLM writes the addendum and rubric from paper.md (validated by the rubric
loader, retried with the error on failure); blacklist = the paper's code repos + given URLs; papers
in the evaluation set (same normalized title or arXiv id) are skipped. Idempotent per task dir."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

import yaml

from klong_jax.factory.papers import extract_metadata, normalize_title
from klong_jax.grading.rubric import RubricError, atomic_write_text, rubric_from_dict

BUILD_PROMPT = (
    "You turn a research paper into a reproduction task, as PaperBench does. Reply with ONE JSON "
    "object with keys \"addendum\" (Markdown clarifications a reproducer needs: ambiguities, "
    "hyper-parameters, what is out of scope) and \"rubric\" (a tree of nodes {\"id\", "
    "\"requirements\", \"weight\" (integer >= 1), \"sub_tasks\", \"task_category\"}; leaves have "
    "no sub_tasks and a task_category of \"Code Development\", \"Code Execution\" or \"Result "
    "Analysis\"; internal nodes have task_category null; ids unique). Cover implementation, "
    "execution and the paper's key results.")


class BuildError(ValueError):
  """The LLM could not produce a valid task after retries; says what was wrong."""


def _json_from(text: str) -> dict[str, Any]:
  m = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.DOTALL)
  raw = m.group(1) if m else text[text.find("{"):text.rfind("}") + 1]
  obj = json.loads(raw)
  if not isinstance(obj, dict):
    raise ValueError("reply is not a JSON object")
  return obj


def eval_index(eval_dirs: Iterable[str]) -> dict[str, set[str]]:
  """Titles and arXiv ids of evaluation papers (task dirs or roots of task dirs)."""
  titles: set[str] = set()
  arxiv: set[str] = set()
  for root in eval_dirs:
    dirs = [root] if os.path.exists(os.path.join(root, "config.yaml")) else [
        os.path.join(root, d) for d in sorted(os.listdir(root))]
    for d in dirs:
      cfg_p, paper_p = os.path.join(d, "config.yaml"), os.path.join(d, "paper.md")
      if os.path.exists(cfg_p):
        with open(cfg_p, encoding="utf-8") as f:
          cfg = yaml.safe_load(f) or {}
        if cfg.get("title"):
          titles.add(normalize_title(str(cfg["title"])))
        if cfg.get("arxiv_id"):
          arxiv.add(str(cfg["arxiv_id"]))
      if os.path.exists(paper_p):
        with open(paper_p, encoding="utf-8") as f:
          meta = extract_metadata(f.read())
        if meta["arxiv_id"]:
          arxiv.add(meta["arxiv_id"])
  return {"titles": titles, "arxiv": arxiv}


def is_duplicate(meta: dict[str, Any], index: dict[str, set[str]]) -> str | None:
  if meta.get("arxiv_id") and meta["arxiv_id"] in index["arxiv"]:
    return f"arXiv id {meta['arxiv_id']} is in the evaluation set"
  t = normalize_title(meta.get("title") or "")
  if t and t in index["titles"]:
    return f"title {meta.get('title')!r} is in the evaluation set"
  return None


def build_task(task_dir: str, client: Any, model: str, extra_blacklist: Iterable[str] = (),
               index: dict[str, set[str]] | None = None, max_retries: int = 2,
               force: bool = False) -> dict[str, Any]:
  """Writes addendum.md, rubric.json, blacklist.txt, config.yaml; returns a status dict."""
  paper_p = os.path.join(task_dir, "paper.md")
  if not os.path.exists(paper_p):
    raise BuildError(f"{task_dir} has no paper.md; run the ingest stage first")
  with open(paper_p, encoding="utf-8") as f:
    paper = f.read()
  meta_p = os.path.join(task_dir, "metadata.json")
  if os.path.exists(meta_p):
    with open(meta_p, encoding="utf-8") as f:
      meta = json.load(f)
  else:
    meta = extract_metadata(paper)
  dup = is_duplicate(meta, index) if index else None
  if dup:
    atomic_write_text(os.path.join(task_dir, "SKIPPED"), dup + "\n")
    return {"status": "skipped", "reason": dup}
  done = all(os.path.exists(os.path.join(task_dir, f))
             for f in ("rubric.json", "addendum.md", "blacklist.txt", "config.yaml"))
  if done and not force:
    return {"status": "exists"}
  msgs = [{"role": "system", "content": BUILD_PROMPT},
          {"role": "user", "content": f"The paper is below:\n{paper}"}]
  errors = []
  for attempt in range(max_retries + 1):
    resp = client.chat.completions.create(model=model, messages=msgs)
    text = resp.choices[0].message.content or ""
    try:
      obj = _json_from(text)
      addendum = str(obj.get("addendum") or "")
      rubric = rubric_from_dict(obj["rubric"])
      break
    except (ValueError, KeyError, RubricError) as e:
      err = f"attempt {attempt + 1}: {type(e).__name__}: {e}"
      errors.append(err)
      logging.warning("%s: invalid task from LLM (%s)", task_dir, err)
      msgs += [{"role": "assistant", "content": text},
               {"role": "user", "content": f"That reply was invalid ({e}). Reply again with one "
                                           "valid JSON object."}]
  else:
    raise BuildError(f"{task_dir}: no valid addendum+rubric after {max_retries + 1} tries: "
                     + "; ".join(errors))
  blacklist = list(dict.fromkeys(list(meta.get("code_urls") or []) + list(extra_blacklist)))
  tid = os.path.basename(os.path.abspath(task_dir))
  cfg = {"id": tid, "title": meta.get("title") or tid, "split": "train"}
  for k in ("venue", "year", "arxiv_id"):
    if meta.get(k):
      cfg[k] = meta[k]
  atomic_write_text(os.path.join(task_dir, "addendum.md"), addendum)
  atomic_write_text(os.path.join(task_dir, "rubric.json"),
                    json.dumps(rubric.to_dict(), indent=2) + "\n")
  atomic_write_text(os.path.join(task_dir, "blacklist.txt"),
                    "\n".join(blacklist) + "\n" if blacklist else "none")
  atomic_write_text(os.path.join(task_dir, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
  return {"status": "built", "leaves": sum(1 for _ in rubric.leaves()), "blacklist": blacklist}
