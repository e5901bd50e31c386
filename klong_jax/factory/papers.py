"""Ingest: paper PDF (pypdf) or Markdown -> `paper.md` + `metadata.json` in a task dir.

Idempotent: a task dir whose metadata records the same source hash is left untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from klong_jax.grading.rubric import atomic_write_text

VENUES = ("ICML", "NeurIPS", "NIPS", "ICLR", "CVPR", "ICCV", "ECCV", "ACL", "EMNLP", "NAACL",
          "AAAI", "IJCAI", "COLM", "TMLR", "JMLR", "UAI", "AISTATS", "CoRL", "KDD")
_URL = re.compile(r"https?://(?:www\.)?(?:github\.com|gitlab\.com|bitbucket\.org|huggingface\.co)"
                  r"/[\w.\-]+/[\w.\-]+", re.IGNORECASE)
_ARXIV = re.compile(r"(?:arXiv:\s*|arxiv\.org/(?:abs|pdf)/)(\d{4}\.\d{4,5})", re.IGNORECASE)
_YEAR = re.compile(r"\b(19[89]\d|20[0-4]\d)\b")


class IngestError(ValueError):
  """A paper source that cannot be ingested; names the file."""


def pdf_to_markdown(path: str) -> str:
  """Text of every page (pypdf), pages separated by blank lines, hyphenated line ends joined."""
  import pypdf  # noqa: PLC0415 - only ingest needs it

  try:
    reader = pypdf.PdfReader(path)
    pages = [(p.extract_text() or "").strip() for p in reader.pages]
  except Exception as e:  # noqa: BLE001 - pypdf raises many types
    raise IngestError(f"cannot read PDF {path}: {e!r}") from None
  text = "\n\n".join(p for p in pages if p)
  text = re.sub(r"(\w)-\n(\w)", r"\1\2", text)
  if not text.strip():
    raise IngestError(f"PDF {path} has no extractable text (scanned?); supply Markdown instead")
  return text + "\n"


def normalize_title(title: str) -> str:
  return re.sub(r"[^a-z0-9]+", " ", title.lower()).strip()


def extract_metadata(text: str) -> dict[str, Any]:
  """Title, venue, year, arXiv id and code URLs found in the paper text."""
  title = ""
  for line in text.splitlines():
    s = line.strip().lstrip("#").strip()
    if len(s) >= 4:
      title = s
      break
  head = text[:5000]
  venue = year = None
  m = re.search(r"\b(" + "|".join(VENUES) + r")\b[\s'’]*(\d{2,4})?", head)
  if m:
    venue = m.group(1)
    if m.group(2):
      y = int(m.group(2))
      year = y if y > 1900 else 2000 + y
  if year is None:
    ym = _YEAR.search(head)
    year = int(ym.group(1)) if ym else None
  urls = []
  for u in _URL.findall(text):
    u = u.rstrip(".,;)")
    u = re.sub(r"\.git$", "", u)
    if u not in urls:
      urls.append(u)
  am = _ARXIV.search(text)
  return {"title": title, "venue": venue, "year": year, "arxiv_id": am.group(1) if am else None,
          "code_urls": urls}


def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def ingest(src: str, task_dir: str, force: bool = False) -> dict[str, Any]:
  """Converts `src` (.pdf or .md/.txt) into `task_dir/paper.md` + `metadata.json`."""
  if not os.path.isfile(src):
    raise IngestError(f"paper source {src} does not exist")
  sha = _sha(src)
  meta_path = os.path.join(task_dir, "metadata.json")
  if not force and os.path.exists(meta_path) and os.path.exists(
      os.path.join(task_dir, "paper.md")):
    with open(meta_path, encoding="utf-8") as f:
      old = json.load(f)
    if old.get("source_sha256") == sha:
      return old
  ext = os.path.splitext(src)[1].lower()
  if ext == ".pdf":
    text = pdf_to_markdown(src)
  elif ext in (".md", ".markdown", ".txt"):
    with open(src, encoding="utf-8") as f:
      text = f.read()
  else:
    raise IngestError(f"paper source {src}: unsupported type {ext!r}; use .pdf or .md")
  meta = extract_metadata(text)
  meta.update(source=os.path.abspath(src), source_sha256=sha)
  atomic_write_text(os.path.join(task_dir, "paper.md"), text)
  atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
  return meta
