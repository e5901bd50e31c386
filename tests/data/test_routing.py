"""Recorded MoE routing through the data path: wire codec, schema v2 (v1 still readable),
render alignment per turn, and splitting + packing keeping routing aligned with tokens."""

import json

import numpy as np
import pytest

from klong_jax.data import packing, schema
from klong_jax.data import routing as routing_lib
from klong_jax.data.render import render_trajectory
from klong_jax.data.schema import Trajectory
from klong_jax.data.splitting import SplitConfig, split_trajectory

from .test_splitting import agent_traj

L, K = 3, 2


def _tagged(n: int) -> np.ndarray:
  """Routing whose ids encode the token index: [i % 250, l] in layer l (tells misalignment)."""
  r = np.zeros((n, L, K), np.int16)
  r[:, :, 0] = (np.arange(n) % 250)[:, None]
  r[:, :, 1] = np.arange(L)[None, :]
  return r


@pytest.mark.parametrize("top", [7, 254, 300])
def test_codec_round_trip_with_missing(top):
  r = _tagged(20)
  r[3, 1, 0] = top
  r[5:8] = -1
  obj = json.loads(json.dumps(routing_lib.encode(r)))
  assert obj["dtype"] == ("uint8" if top < 255 else "uint16")
  np.testing.assert_array_equal(routing_lib.decode(obj), r)


def test_schema_round_trip_with_routing_and_old_records_read():
  traj = agent_traj(10, [(6, [4]), (5, [])])
  traj.routing = _tagged(len(traj))
  traj.routing[-1] = -1
  back = schema.from_bytes(traj.to_bytes())
  assert back.schema == schema.SCHEMA_VERSION == 2
  np.testing.assert_array_equal(back.routing, traj.routing)
  np.testing.assert_array_equal(back.tokens, traj.tokens)
  # A v1 record (written before routing existed) still reads, without routing.
  old = traj.to_json()
  old.pop("routing")
  old["schema"] = 1
  v1 = schema.validate(old)
  assert v1.routing is None and v1.tokens.tolist() == traj.tokens.tolist()
  # And a record without routing round-trips as None.
  traj.routing = None
  assert schema.from_bytes(traj.to_bytes()).routing is None


def test_schema_rejects_misaligned_routing():
  traj = agent_traj(10, [(6, [4])])
  rec = traj.to_json()
  rec["routing"] = routing_lib.encode(_tagged(len(traj) - 1))
  with pytest.raises(schema.TrajectoryError, match="routing"):
    schema.validate(rec)
  rec["routing"] = {"shape": [1, 1, 1], "dtype": "uint8", "data": "!!"}
  with pytest.raises(schema.TrajectoryError, match="routing"):
    schema.validate(rec)


@pytest.mark.parametrize("keep_positions", [True, False])
def test_split_and_pack_keep_routing_aligned(keep_positions):
  traj = agent_traj(12, [(20, [15]), (25, [10, 8]), (18, [30]), (22, [])] * 3)
  traj.tokens = np.arange(len(traj), dtype=np.int32)  # Token = its index.
  traj.routing = _tagged(len(traj))
  traj.routing[7] = -1
  cfg = SplitConfig(max_len=96, overlap=16, keep_positions=keep_positions, min_new_frac=0.0)
  chunks = split_trajectory(traj, cfg, advantage=1.0)
  assert len(chunks) > 2
  for c in chunks:
    want = traj.routing[c.tokens]
    np.testing.assert_array_equal(c.routing, want)
  rows = packing.pack_chunks(chunks, row_len=128, routing_shape=(L, K))
  seg = rows["segment_ids"] > 0
  assert rows["routing"].shape == (*rows["tokens"].shape, L, K)
  np.testing.assert_array_equal(rows["routing"][seg], traj.routing[rows["tokens"][seg]])
  assert (rows["routing"][~seg] == -1).all()
  # Chunks without routing (SFT data) pack as "not recorded".
  for c in chunks:
    c.routing = None
  assert (packing.pack_chunks(chunks, 128, routing_shape=(L, K))["routing"] == -1).all()


def _record(prompt, sampled, start=0, tag=0):
  """A server routed_experts record for `prompt` + `sampled`: ids tag + token index."""
  n = len(prompt) + len(sampled)
  r = _tagged(n)
  r[:, :, 1] = tag
  r[-1] = -1  # The last sampled token is never fed back.
  rec = routing_lib.encode(r[start:])
  rec.update(start=start, prompt_len=len(prompt),
             prompt_crc32=routing_lib.prompt_checksum(prompt))
  return rec


def test_render_places_each_turns_routing(fmt):
  sys_ = {"role": "system", "content": "sys"}
  task = {"role": "user", "content": "task"}
  msgs = [sys_, task]
  first = [40, 41, 42, fmt.end_id]
  prompt1 = fmt.render_prompt(msgs)
  msgs.append({"role": "assistant", "content": "", "klong": {
      "token_ids": first, "routed_experts": _record(prompt1, first, tag=1)}})
  msgs.append({"role": "tool", "content": "out", "tool_call_id": "c0"})
  prompt2 = fmt.render_prompt(msgs)
  second = [50, 51, fmt.end_id]
  start = routing_lib.next_start(msgs[2]["klong"]["routed_experts"], len(first))
  assert start == len(prompt1) + len(first) - 1
  msgs.append({"role": "assistant", "content": "", "klong": {
      "token_ids": second, "routed_experts": _record(prompt2, second, start, tag=2)}})
  f = render_trajectory(msgs, fmt, prefix_messages=2)
  r = f["routing"]
  n = len(f["tokens"])
  assert r.shape == (n, L, K)
  assert f["tokens"][:len(prompt2)].tolist() == prompt2  # The server saw the trajectory prefix.
  np.testing.assert_array_equal(r[:-1, :, 0], np.broadcast_to((np.arange(n - 1) % 250)[:, None],
                                                              (n - 1, L)))
  assert (r[:start, :, 1] == 1).all() and (r[start:-1, :, 1] == 2).all()
  assert (r[-1] == -1).all()
  traj = schema.validate(dict(f, id="x", task_id="t"))
  np.testing.assert_array_equal(traj.routing, r)

  # A trimmed context (prompt != trajectory prefix): only the sampled tokens are placed.
  trimmed = dict(msgs[4])
  trimmed["klong"] = dict(trimmed["klong"], routed_experts=_record(prompt2[5:], second, tag=2))
  f2 = render_trajectory(msgs[:4] + [trimmed], fmt, prefix_messages=2)
  body = f2["turn_starts"][4] + 1
  assert (f2["routing"][body:body + 2, :, 1] == 2).all()
  assert (f2["routing"][len(prompt1) + len(first) - 1:body] == -1).all()


def test_teacher_data_has_no_routing(fmt):
  f = render_trajectory([{"role": "system", "content": "s"},
                         {"role": "assistant", "content": "hi"}], fmt)
  assert f["routing"] is None
  t = Trajectory(id="a", task_id="t", prefix_end=0, **{k: v for k, v in f.items()
                                                       if k != "prefix_end"})
  assert "routing" not in t.to_json()
