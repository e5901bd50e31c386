"""Runner and local backend: deadlines kill the group, output is bounded, files round-trip."""

import io
import os
import tarfile
import time

import pytest

from klong_jax.sandbox.base import (
    SubmissionError,
    extract_tar_stream,
    make_sandbox,
    parse_runner_output,
)


@pytest.fixture
def sb():
  with make_sandbox("local", max_output=4096, kill_grace_s=0.3) as s:
    yield s


def test_exec_and_files(sb, tmp_path):
  sb.put_files({"a/b.txt": b"x"}, dest="/workspace/sub")
  r = sb.exec("cat a/b.txt; pwd; exit 3", 10, workdir="/workspace/sub")
  assert r.exit_code == 3 and r.output.startswith("x/workspace/sub"), r
  sb.get_dir("/workspace/sub", str(tmp_path / "o"))
  assert (tmp_path / "o" / "a" / "b.txt").read_bytes() == b"x"
  with pytest.raises(ValueError, match="inside"):
    sb.put_files({"../evil": b"1"})


def test_timeout_kills_group_even_if_term_ignored(sb):
  t0 = time.time()
  r = sb.exec("trap '' TERM; (sleep 30 &); echo hi; sleep 30", 0.5)
  assert r.timed_out and r.exit_code == 124 and "hi" in r.output
  assert time.time() - t0 < 5


def test_background_jobs_die_with_command(sb):
  r = sb.exec("sleep 30 & echo $!", 5)
  pid = int(r.output.split()[0])
  time.sleep(0.2)
  state = sb.exec(f"ps -o stat= -p {pid} || true", 5).output.strip()
  assert state == "" or state.startswith("Z"), state  # Gone, or a zombie (flags: "ZN" niced).


def test_output_truncated_head_and_tail(sb):
  r = sb.exec("seq 1 200000", 20)
  assert r.truncated and r.output.startswith("1\n2\n") and r.output.rstrip().endswith("200000")
  assert len(r.output) < 5000


def test_parse_runner_output_without_trailer():
  text, st = parse_runner_output(b"partial", 137)
  assert st["exit_code"] == 137 and "without status" in text


def test_extract_refuses_escape_and_caps_size(tmp_path):
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w") as tar:
    for name, data in [("top/../../evil", b"e"), ("top/ok.txt", b"ok"), ("top/big", b"z" * 5000)]:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  raw = buf.getvalue()
  with pytest.raises(SubmissionError, match="max_get_bytes") as e:
    extract_tar_stream([raw], str(tmp_path / "a"), max_bytes=1000)
  assert e.value.kind == "too_large"
  with pytest.raises(SubmissionError, match="more than 1 files") as e:
    extract_tar_stream([raw], str(tmp_path / "c"), max_bytes=1 << 20, max_files=1)
  assert e.value.kind == "too_many_files"
  extract_tar_stream([raw[i:i + 100] for i in range(0, len(raw), 100)], str(tmp_path / "b"),
                     max_bytes=1 << 20)
  assert (tmp_path / "b" / "ok.txt").read_bytes() == b"ok"
  assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_get_dir_limits_are_the_agents_fault(tmp_path):
  with make_sandbox("local", max_get_bytes=1 << 20, max_get_files=20) as s:
    s.exec("mkdir -p /workspace/s && cd /workspace/s && echo hi > a.txt && "
           "ln -s /etc/passwd out && mkfifo pipe", 10)
    s.get_dir("/workspace/s", str(tmp_path / "ok"))
    assert os.listdir(tmp_path / "ok") == ["a.txt"]  # Links and fifos are left out, as on docker.
    s.exec("truncate -s 300M /workspace/s/big.bin", 10)
    with pytest.raises(SubmissionError, match=r"big.bin \(300.0 MiB\)") as e:
      s.get_dir("/workspace/s", str(tmp_path / "big"))
    assert e.value.kind == "too_large"
    s.exec("rm /workspace/s/big.bin && touch /workspace/s/f{1..30}", 10)
    with pytest.raises(SubmissionError, match="more than 20 files") as e:
      s.get_dir("/workspace/s", str(tmp_path / "many"))
    assert e.value.kind == "too_many_files"
    with pytest.raises(FileNotFoundError):
      s.get_dir("/workspace/nope", str(tmp_path / "none"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files of any mode")
def test_get_dir_unreadable_file_is_the_agents_fault(tmp_path):
  with make_sandbox("local") as s:
    s.exec("mkdir -p /workspace/s && echo x > /workspace/s/secret && chmod 000 /workspace/s/secret",
           10)
    with pytest.raises(SubmissionError, match="secret cannot be read") as e:
      s.get_dir("/workspace/s", str(tmp_path / "o"))
    assert e.value.kind == "unreadable"


def test_unknown_backend_and_limit():
  with pytest.raises(ValueError, match="unknown sandbox backend"):
    make_sandbox("podman")
  with pytest.raises(ValueError, match="unknown sandbox limit"):
    make_sandbox("local", memory="1g")
