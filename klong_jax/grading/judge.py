"""LLM judge over any OpenAI-compatible endpoint, after PaperBench's SimpleJudge (JAX-free).

Per leaf: list the submission's candidate files (by category), ask the model to rank the most
relevant ones, read them within a budget, then ask for a 0/1 verdict with explanation (for Code
Execution / Result Analysis the reproduce.sh log is included). Verdicts are parsed from the
`# Score` section; malformed or refused verdicts are retried, then marked as judge failures
(valid_score False), never silently scored 0. Requests run on a `JudgeQueue`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from klong_jax.grading.judge_queue import JudgeQueue
from klong_jax.grading.rubric import (
    CODE_DEVELOPMENT,
    RESULT_ANALYSIS,
    LeafGrade,
    RubricNode,
)

SKIP_DIR_PARTS = ("venv", ".venv", ".env", "wandb", ".egg-info", ".git", ".github",
                  "__pycache__", "node_modules")
DOC_EXT = (".md", ".txt", ".rst")
CODE_EXT = (".py", ".R", ".Rmd", ".m", ".jl", ".c", ".h", ".cpp", ".hpp", ".cc", ".cxx", ".hxx",
            ".java", ".js", ".ts", ".scala", ".go", ".rs", ".sh", ".config", ".cfg", ".json",
            ".yaml", ".yml", ".toml", ".ini")
TABLE_EXT = (".csv", ".tsv", ".psv", ".json", ".jsonl", ".html", ".xml", ".yaml", ".yml",
             ".toml", ".arff", ".tex", ".svm", ".libsvm")
CATEGORY_QUESTIONS = {
    "Code Development": "Does the code in the submission contain a correct implementation of "
                        "this? Descriptions or plans alone do not count.",
    "Code Execution": "Does running reproduce.sh execute this successfully, as the log shows?",
    "Result Analysis": "Did the reproduce.sh run produce evidence that agrees with the results "
                       "stated here?",
}
FILE_RANKING_PROMPT = (
    "You are helping grade a reproduction of a research paper. Given the paper, a grading "
    "criterion and the submission's file tree, list the files most relevant to judging the "
    "criterion, one full relative path per line, most relevant first. Output only paths.")
JUDGE_SYSTEM_PROMPT = (
    "You are a strict grader of research-paper reproductions. You see the paper, an addendum, "
    "files from the submission and (when relevant) the reproduce.sh log, and one criterion. "
    "Missing files count as failure.")
GRADING_PROMPT = (
    "Answer in three Markdown sections:\n# Expectations\nwhat a correct submission shows\n"
    "# Reality\nwhat this submission shows, citing files\n# Score\n"
    "a single line with 0 or 1 (1 only if the criterion is met), then a one-sentence reason.\n"
    "Always give a score.")
_SCORE = re.compile(r"#+\s*Score\s*:?\s*\n?\s*[*`\"']*\s*([01](?:\.0+)?)(?!\.?\d)", re.IGNORECASE)
CHARS_PER_TOKEN = 4


class VerdictParseError(ValueError):
  """The judge's answer held no 0/1 score."""


def parse_verdict(text: str | None) -> tuple[float, str]:
  """(score, explanation) from a `# Score` section; raises VerdictParseError when absent."""
  if not text or not text.strip():
    raise VerdictParseError("empty judge response")
  matches = list(_SCORE.finditer(text))
  if not matches:
    raise VerdictParseError(f"no '# Score' section with 0 or 1 in: {text[:200]!r}")
  m = matches[-1]
  expl = text[m.end():].lstrip("*`\"' \n:.-").strip() or text[:m.start()].strip()
  return float(m.group(1)), " ".join(expl.split())[:2000]


def candidate_files(submission_dir: str, category: str | None) -> list[str]:
  """Relative paths the judge may read for a leaf of `category` (PaperBench's whitelist)."""
  if category == RESULT_ANALYSIS:
    exts = DOC_EXT + TABLE_EXT
  else:
    exts = DOC_EXT + CODE_EXT
  out = []
  for dirpath, dirnames, names in os.walk(submission_dir):
    rel_dir = os.path.relpath(dirpath, submission_dir)
    if rel_dir != "." and any(s in rel_dir for s in SKIP_DIR_PARTS):
      dirnames[:] = []
      continue
    dirnames.sort()
    for n in sorted(names):
      if n.endswith(exts):
        out.append(os.path.normpath(os.path.join(rel_dir, n)))
  return out


def prior_requirements(rubric: RubricNode) -> dict[str, list[str]]:
  """leaf id -> requirements of its ancestors and of preceding siblings (PaperBench context)."""
  out: dict[str, list[str]] = {}

  def walk(n: RubricNode, ctx: list[str]) -> None:
    if n.is_leaf:
      out[n.id] = ctx
      return
    here = ctx + [n.requirements]
    for i, c in enumerate(n.sub_tasks):
      walk(c, here + [s.requirements for s in n.sub_tasks[:i]])

  walk(rubric, [])
  return out


def _read(path: str, limit: int) -> str | None:
  try:
    with open(path, "rb") as f:
      raw = f.read(limit)
  except OSError:
    return None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return raw.decode("latin1")


class LLMJudge:
  """Grades non-programmatic leaves with a chat model behind an OpenAI-compatible API."""

  def __init__(self, base_url: str | None = None, model: str = "judge", api_key: str = "EMPTY",
               client: Any = None, queue: JudgeQueue | None = None, max_concurrency: int = 8,
               max_retries: int = 3, max_files: int = 10, max_file_bytes: int = 200_000,
               n_ctx_tokens: int = 128_000, request_timeout_s: float = 300.0,
               retry_backoff_s: float = 0.5, temperature: float | None = 0.0):
    if client is None:
      import openai  # noqa: PLC0415 - only the LLM judge needs the client
      client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=request_timeout_s,
                             max_retries=0)
    self.client = client
    self.model = model
    self.queue = queue or JudgeQueue(max_concurrency)
    self.max_retries = max_retries
    self.max_files = max_files
    self.max_file_bytes = max_file_bytes
    self.n_ctx_chars = n_ctx_tokens * CHARS_PER_TOKEN
    self.retry_backoff_s = retry_backoff_s
    self.temperature = temperature

  def _chat(self, messages: list[dict[str, str]]) -> Any:
    kw: dict[str, Any] = {"model": self.model, "messages": messages}
    if self.temperature is not None:
      kw["temperature"] = self.temperature
    return self.client.chat.completions.create(**kw)

  def _rank_files(self, paper: str, addendum: str, criterion: str, files: list[str],
                  submission_dir: str) -> list[str]:
    if len(files) <= 1:
      return files
    tree = "\n".join(files)
    msgs = [{"role": "system", "content": FILE_RANKING_PROMPT},
            {"role": "user", "content": f"The paper is below:\n{paper[:self.n_ctx_chars // 4]}\n"
                                        f"<addendum>\n{addendum}\n</addendum>\n"
                                        f"<criterion>\n{criterion}\n</criterion>\n"
                                        f"<files>\n{tree}\n</files>"}]
    try:
      resp = self._chat(msgs)
      text = resp.choices[0].message.content or ""
    except Exception as e:  # noqa: BLE001 - ranking is best-effort; fall back to tree order
      logging.warning("file ranking failed (%r); using tree order", e)
      return files[:self.max_files]
    known = set(files)
    ranked = []
    for line in text.splitlines():
      p = os.path.normpath(line.strip().strip("`-* ").removeprefix("./")) if line.strip() else ""
      if p in known and p not in ranked:
        ranked.append(p)
    return (ranked or files)[:self.max_files]

  def _files_block(self, submission_dir: str, rel_paths: list[str], budget_chars: int) -> str:
    parts, used = [], 0
    for rel in rel_paths:
      content = _read(os.path.join(submission_dir, rel), self.max_file_bytes)
      if content is None:
        continue
      block = f"<FILE:{rel}>\n{content or '(FILE IS EMPTY)'}\n</FILE:{rel}>\n"
      if used + len(block) > budget_chars:
        parts.append(block[:max(0, budget_chars - used)].rsplit("\n", 1)[0])
        break
      parts.append(block)
      used += len(block)
    return "".join(parts)

  def grade_leaf(self, task: Any, leaf: RubricNode, submission_dir: str,
                 reproduce_log: str | None, prior: Sequence[str] = (),
                 code_dev: bool = False) -> LeafGrade:
    """One leaf -> (score, valid, explanation, metadata); retries, then a marked failure."""
    paper = getattr(task, "paper_md", "") or ""
    addendum = (f"{getattr(task, 'addendum_md', '') or ''}\n"
                f"{getattr(task, 'judge_addendum_md', '') or ''}").strip() or "(NO ADDENDUM GIVEN)"
    cat = leaf.task_category
    with_log = cat != CODE_DEVELOPMENT
    log = reproduce_log if reproduce_log is not None else "(Does not exist)"
    fixed = len(paper) + (len(log) if with_log else 0) + len(addendum)
    budget = max(4000, self.n_ctx_chars - fixed - 10_000 * CHARS_PER_TOKEN)
    files = candidate_files(submission_dir, cat) if os.path.isdir(submission_dir) else []
    ranked = self._rank_files(paper, addendum, leaf.requirements, files, submission_dir)
    repro_sh = _read(os.path.join(submission_dir, "reproduce.sh"), self.max_file_bytes)
    question = CATEGORY_QUESTIONS.get(cat or "", "Does the submission satisfy this criterion?")
    preceding = "".join(f" -> {r}\n" for r in prior)
    user = [f"The paper is below:\n{paper}", f"<addendum>\n{addendum}\n</addendum>",
            f"<files>\n{self._files_block(submission_dir, ranked, budget)}\n</files>"]
    if not code_dev:
      user.append(f"<reproduce.sh>\n{repro_sh or '(Does not exist)'}\n</reproduce.sh>")
    if with_log:
      user.append(f"<reproduce.log>\n{log}\n</reproduce.log>")
    user.append(f"<preceding_criteria>\n{preceding}</preceding_criteria>\n"
                f"<criterion>\n{leaf.requirements}\n</criterion>\n"
                f"The criterion you are grading is of type {cat} - {question}\n\n{GRADING_PROMPT}")
    msgs = [{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
            {"role": "user", "content": "\n\n".join(user)}]
    errors: list[str] = []
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.retry_backoff_s * attempt)
      try:
        resp = self._chat(msgs)
      except Exception as e:  # noqa: BLE001 - API errors are retried, then marked
        errors.append(f"attempt {attempt + 1}: API error {e!r}"[:300])
        continue
      msg = resp.choices[0].message
      refusal = getattr(msg, "refusal", None)
      if refusal:
        errors.append(f"attempt {attempt + 1}: refused: {refusal!r}"[:300])
        continue
      try:
        score, expl = parse_verdict(msg.content)
      except VerdictParseError as e:
        errors.append(f"attempt {attempt + 1}: {e}"[:300])
        continue
      return score, True, expl, {"full_judge_response": msg.content, "attempts": attempt + 1,
                                 "files": ranked}
    return 0.0, False, "judge failure: " + "; ".join(errors), {"attempts": self.max_retries + 1,
                                                               "errors": errors}

  def grade_leaves(self, task: Any, rubric: RubricNode, leaves: Sequence[RubricNode],
                   submission_dir: str, reproduce_log: str | None, priority: Any = 1,
                   code_dev: bool = False) -> dict[str, LeafGrade]:
    """Grades `leaves` concurrently through the queue (smaller `priority` runs first)."""
    prior = prior_requirements(rubric)
    key = priority if isinstance(priority, tuple) else (priority,)
    futs = {leaf.id: self.queue.submit(
        lambda leaf=leaf: self.grade_leaf(task, leaf, submission_dir, reproduce_log,
                                          prior.get(leaf.id, ()), code_dev), key)
        for leaf in leaves}
    out = {}
    for lid, f in futs.items():
      try:
        out[lid] = f.result()
      except Exception as e:  # noqa: BLE001 - never lose a leaf: mark it
        out[lid] = (0.0, False, f"judge failure: {e!r}", None)
    return out
