"""Generates the bundled tokenizer corpus (`assets/corpus.txt`) from templates, deterministically.

The text mimics what agent trajectories hold: paper-style markdown, python, bash sessions, tool
outputs (ls, pytest, pip, tracebacks), JSON tool calls and numbers. Run
`python -m klong_jax.data.corpus_gen` to rewrite the asset.
"""

from __future__ import annotations

import json
import pathlib
import random

_NOUNS = ["model", "agent", "trajectory", "policy", "reward", "gradient", "dataset", "experiment",
          "baseline", "checkpoint", "tokenizer", "optimizer", "layer", "attention", "expert",
          "router", "sandbox", "rubric", "judge", "paper", "figure", "table", "result", "loss",
          "sample", "batch", "sequence", "window", "chunk", "prefix", "score", "task", "repository"]
_VERBS = ["train", "evaluate", "compute", "reproduce", "measure", "compare", "report", "improve",
          "split", "pack", "shuffle", "load", "save", "restore", "run", "check", "plot", "fit"]
_ADJ = ["long", "short", "stable", "noisy", "sparse", "dense", "large", "small", "robust", "fast",
        "slow", "random", "fixed", "adaptive", "hierarchical", "linear", "nonlinear", "optimal"]
_FILES = ["main.py", "train.py", "model.py", "utils.py", "data.py", "eval.py", "README.md",
          "reproduce.sh", "config.yaml", "requirements.txt", "results.json", "plot.py", "paper.md"]
_PKGS = ["numpy", "torch", "scipy", "pandas", "matplotlib", "scikit-learn", "jax", "tqdm", "pyyaml"]
_CMDS = ["ls -la", "cat {f}", "python {f}", "pip install {p}", "head -n 20 {f}", "wc -l {f}",
         "grep -n 'def ' {f}", "mkdir -p outputs", "bash reproduce.sh", "git status",
         "python -m pytest -q", "nvidia-smi", "du -sh .", "tail -n 5 log.txt", "echo $PATH"]


def _sentence(r: random.Random) -> str:
  s = (f"The {r.choice(_ADJ)} {r.choice(_NOUNS)} {r.choice(_VERBS)}s the {r.choice(_NOUNS)} "
       f"with {r.randint(2, 512)} {r.choice(_NOUNS)}s and a {r.choice(_ADJ)} {r.choice(_NOUNS)}")
  if r.random() < 0.4:
    s += f", reaching {r.uniform(0, 100):.{r.randint(1, 3)}f}% on the {r.choice(_NOUNS)} split"
  return s + "."


def _markdown(r: random.Random) -> str:
  n = r.randint(1, 9)
  lines = [f"## {n}. {r.choice(_ADJ).title()} {r.choice(_NOUNS)} {r.choice(_VERBS)}ing", ""]
  lines += [" ".join(_sentence(r) for _ in range(r.randint(2, 5))), ""]
  if r.random() < 0.5:
    lines += [f"| {r.choice(_NOUNS)} | {r.choice(_NOUNS)} | score |", "|---|---|---|"]
    for _ in range(r.randint(2, 5)):
      lines.append(f"| {r.choice(_ADJ)} | {r.randint(1, 9999)} | {r.uniform(0, 1):.3f} |")
    lines.append("")
  if r.random() < 0.5:
    lines += [f"- **{r.choice(_NOUNS)}**: {_sentence(r)}" for _ in range(r.randint(2, 4))]
    lines.append("")
  if r.random() < 0.3:
    lines += [f"$$ L = -\\frac{{1}}{{{r.randint(2, 64)}}} \\sum_t \\log p(x_t | x_{{<t}}) $$", ""]
  return "\n".join(lines)


def _python(r: random.Random) -> str:
  fn = f"{r.choice(_VERBS)}_{r.choice(_NOUNS)}"
  arg = r.choice(_NOUNS)
  body = [
      f"def {fn}({arg}, num_steps: int = {r.randint(1, 1000)}) -> float:",
      f'    """{_sentence(r)}"""',
      "    total = 0.0",
      "    for step in range(num_steps):",
      f"        value = {arg}[step % len({arg})] * {r.uniform(0.1, 9):.2f}",
      "        if value > total:",
      "            total = value",
      f"    print(f\"step {{step}}: {r.choice(_NOUNS)}={{total:.4f}}\")",
      "    return total",
      "",
  ]
  if r.random() < 0.5:
    body = [f"import {r.choice(_PKGS).replace('-', '_')}", "import os", ""] + body
  if r.random() < 0.4:
    cls = r.choice(_NOUNS).title()
    body += [f"class {cls}:", f"    def __init__(self, size={r.randint(1, 64)}):",
             "        self.size = size", f"        self.{r.choice(_NOUNS)} = []", "",
             "    def __len__(self):", "        return self.size", ""]
  return "```python\n" + "\n".join(body) + "```\n"


def _shell(r: random.Random) -> str:
  out = []
  for _ in range(r.randint(1, 3)):
    cmd = r.choice(_CMDS).format(f=r.choice(_FILES), p=r.choice(_PKGS))
    out.append(f"$ {cmd}")
    kind = r.random()
    if cmd.startswith("ls"):
      for f in r.sample(_FILES, r.randint(2, 6)):
        out.append(f"-rw-r--r-- 1 agent agent {r.randint(10, 99999):>6} Mar {r.randint(1, 28):>2}"
                   f" {r.randint(0, 23):02d}:{r.randint(0, 59):02d} {f}")
    elif "pytest" in cmd:
      p, f = r.randint(0, 40), r.randint(0, 3)
      out.append("." * min(p, 30) + "F" * f)
      out.append(f"{p} passed, {f} failed in {r.uniform(0.1, 60):.2f}s")
    elif "pip" in cmd:
      out.append(f"Successfully installed {cmd.split()[-1]}-{r.randint(0, 3)}.{r.randint(0, 20)}"
                 f".{r.randint(0, 9)}")
    elif kind < 0.3:
      out += ["Traceback (most recent call last):",
              f'  File "{r.choice(_FILES)}", line {r.randint(1, 400)}, in <module>',
              f"    {r.choice(_VERBS)}({r.choice(_NOUNS)})",
              r.choice([f"KeyError: '{r.choice(_NOUNS)}'", "ValueError: shapes do not match",
                        f"ModuleNotFoundError: No module named '{r.choice(_PKGS)}'",
                        "RuntimeError: CUDA out of memory"])]
    else:
      for _ in range(r.randint(1, 4)):
        out.append(f"epoch {r.randint(0, 99)} {r.choice(_NOUNS)} {r.uniform(0, 5):.4f} "
                   f"acc {r.uniform(0, 1):.4f} time {r.randint(1, 9999)}ms")
  return "\n".join(out) + "\n"


def _tool_call(r: random.Random) -> str:
  cmd = r.choice(_CMDS).format(f=r.choice(_FILES), p=r.choice(_PKGS))
  call = r.choice([{"name": "bash", "arguments": {"command": cmd}},
                   {"name": "read_file", "arguments": {"path": r.choice(_FILES)}},
                   {"name": "write_file", "arguments": {"path": r.choice(_FILES),
                                                        "content": _sentence(r)}}])
  return f"I will {r.choice(_VERBS)} the {r.choice(_NOUNS)} next. {json.dumps(call)}\n"


def generate(target_bytes: int = 200_000, seed: int = 0) -> str:
  """Returns about `target_bytes` of mixed corpus text (same seed -> same text)."""
  r = random.Random(seed)
  parts, size = [], 0
  makers = [_markdown, _python, _shell, _tool_call, lambda r: _sentence(r) + "\n"]
  while size < target_bytes:
    part = r.choice(makers)(r) + "\n"
    parts.append(part)
    size += len(part.encode("utf-8"))
  return "".join(parts)


def main() -> None:
  out = pathlib.Path(__file__).resolve().parent / "assets" / "corpus.txt"
  out.parent.mkdir(exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text(generate(), encoding="utf-8")
  tmp.replace(out)
  print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
