"""read_file_chunk / search_file stream the file in the sandbox: only the asked chunk is kept."""

import pytest

from klong_jax.agent.tools import execute_tool
from klong_jax.sandbox.base import make_sandbox


@pytest.fixture
def sb():
  # Address-space limit 4 * 64 MiB: reading the 300 MB file whole would fail with MemoryError.
  with make_sandbox("local", mem_bytes=64 << 20) as s:
    s.put_files({"a.txt": b"l1\nl2\r\nL3", "empty.txt": b"", "long.txt": b"y" * 9000 + b"\nz\n"})
    s.exec("truncate -s 300M big.bin && printf '\\nlast\\n' >> big.bin", 10)
    yield s


def _read(sb, **args):
  return execute_tool(sb, "read_file_chunk", args, 60)


def test_read_file_chunk(sb):
  assert _read(sb, file="a.txt").content == (
      "File has 3 total lines. Showing lines 1 to 3.\n\n1: l1\n2: l2\n3: L3")
  assert _read(sb, file="a.txt", start_line=2, max_lines=1).content.endswith("\n\n2: l2")
  assert _read(sb, file="empty.txt").content == "File has 0 total lines. Showing lines 1 to 0."
  out = _read(sb, file="a.txt", start_line=9)
  assert out.error and "past the end of the file (3 lines)" in out.content
  long = _read(sb, file="long.txt").content
  assert "1: " + "y" * 2000 + " [... line cut: 9000 bytes]\n2: z" in long


def test_read_file_chunk_large_and_special_files(sb):
  out = _read(sb, file="big.bin", start_line=2)
  assert not out.error, out.content[-500:]
  assert out.content == "File has 2 total lines. Showing lines 2 to 2.\n\n2: last"
  for path, why in [("/dev/zero", "is not a regular file"), ("/workspace", "is a directory"),
                    ("nope.txt", "No such file or directory")]:
    out = _read(sb, file=path)
    assert out.error and why in out.content, out.content


def test_search_file_streams(sb):
  out = execute_tool(sb, "search_file", {"file": "big.bin", "query": "LAST"}, 60)
  assert out.content.startswith("[Match 1 of 1]\n    1: ") and ">>> 2: last" in out.content
  assert len(out.content) < 3000
  out = execute_tool(sb, "search_file", {"file": "a.txt", "query": "l", "max_matches": 1,
                                         "page": 2, "context_lines": 1}, 60)
  assert out.content == "[Match 2 of 3]\n    1: l1\n>>> 2: l2\n    3: L3\n\nPage 2 of 3."
  out = execute_tool(sb, "search_file", {"file": "/dev/zero", "query": "x"}, 60)
  assert out.error and "is not a regular file" in out.content
