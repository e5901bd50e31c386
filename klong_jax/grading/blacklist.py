"""Blacklist enforcement: did a submission fetch the paper's own code (PaperBench monitor rule)?"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

_FETCH = re.compile(r"git\s+(clone|submodule|fetch|pull|remote)|curl|wget|pip\s+install|"
                    r"urlopen|urlretrieve|requests\.get|httpx\.get|hf_hub_download|snapshot_download",
                    re.IGNORECASE)
_SCAN_EXT = (".sh", ".py", ".txt", ".md", ".cfg", ".toml", ".yaml", ".yml", ".ipynb", "")
_MAX_SCAN_BYTES = 2_000_000


def normalize(entry: str) -> str:
  """`https://GitHub.com/a/b.git/` -> `github.com/a/b` (scheme, www, .git and slashes dropped)."""
  e = entry.strip().lower()
  e = re.sub(r"^[a-z+]+://", "", e)
  e = re.sub(r"^git@([^:]+):", r"\1/", e)
  e = e.removeprefix("www.").rstrip("/")
  return e.removesuffix(".git")


def _pattern(entry: str) -> re.Pattern[str]:
  return re.compile(re.escape(normalize(entry)) + r"(?=$|\.git\b|[/\s\"'#?:)\]>,;])")


def find_violation(blacklist: Iterable[str], commands: Iterable[str] = (),
                   submission_dir: str | None = None) -> str | None:
  """A reason string if any recorded command or submission file fetches a blacklisted entry."""
  pats = [(b, _pattern(b)) for b in blacklist if normalize(b)]
  if not pats:
    return None

  def hit(text: str) -> str | None:
    low = text.lower().replace("www.", "")
    for raw, p in pats:
      if p.search(low) or p.search(low.replace("git@github.com:", "github.com/")):
        return raw
    return None

  for cmd in commands:
    b = hit(cmd)
    if b:
      return f"recorded command accessed blacklisted resource {b!r}: {cmd[:200]!r}"
  if submission_dir and os.path.isdir(submission_dir):
    for dirpath, dirnames, names in os.walk(submission_dir):
      rel_dir = os.path.relpath(dirpath, submission_dir)
      in_git = rel_dir.split(os.sep)[0] == ".git"
      dirnames[:] = [d for d in dirnames if d not in ("node_modules", "__pycache__")
                     and (d != "objects" or not in_git)]
      for name in names:
        path = os.path.join(dirpath, name)
        if in_git and name != "config" and not name.endswith(".gitmodules"):
          continue
        if not in_git and os.path.splitext(name)[1] not in _SCAN_EXT and name != ".gitmodules":
          continue
        try:
          with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(_MAX_SCAN_BYTES)
        except OSError:
          continue
        for line in text.splitlines():
          if (in_git or name == ".gitmodules" or _FETCH.search(line)) and (b := hit(line)):
            rel = os.path.relpath(path, submission_dir)
            return f"{rel} fetches blacklisted resource {b!r}: {line.strip()[:200]!r}"
  return None
