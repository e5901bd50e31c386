"""ArrayRecord shards: round trip, atomic publish, corrupt files named in errors."""

import pytest

from klong_jax.data import shards


def test_round_trip_and_listing(tmp_path):
  recs = [b"rec%d" % i * (i + 1) for i in range(300)]
  p = shards.write_shard(tmp_path / "w0" / "a-0.array_record", recs)
  assert list(shards.read_shard(p)) == recs and shards.num_records(p) == 300
  assert shards.list_shards(tmp_path) == [str(p)]


def test_unfinished_or_failed_writer_publishes_nothing(tmp_path):
  w = shards.ShardWriter(tmp_path / "s.array_record")
  w.write(b"x")
  assert shards.list_shards(tmp_path) == []  # temp file is hidden until close
  w.close()
  assert shards.list_shards(tmp_path) == [str(tmp_path / "s.array_record")]
  with pytest.raises(RuntimeError, match="boom"):
    with shards.ShardWriter(tmp_path / "t.array_record") as w2:
      w2.write(b"y")
      raise RuntimeError("boom")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["s.array_record"]
  with pytest.raises(ValueError, match="must end with .array_record"):
    shards.ShardWriter(tmp_path / "bad.bin")


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty"])
def test_corrupt_shard_error_names_file(tmp_path, damage):
  p = shards.write_shard(tmp_path / "c.array_record", [b"payload-%d" % i * 50 for i in range(2000)])
  raw = bytearray(p.read_bytes())
  if damage == "truncate":
    raw = raw[: len(raw) // 2]
  elif damage == "garble":
    raw[100:300] = bytes(200)
  else:
    raw = b""
  p.write_bytes(bytes(raw))
  with pytest.raises(shards.ShardError, match="c.array_record"):
    shards.validate_shard(p)


def test_missing_paths(tmp_path):
  with pytest.raises(shards.ShardError, match="nope.array_record does not exist"):
    list(shards.read_shard(tmp_path / "nope.array_record"))
  with pytest.raises(FileNotFoundError, match="shard directory"):
    shards.list_shards(tmp_path / "nodir")
