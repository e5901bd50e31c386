"""render_trajectory: sampler ids used verbatim with logprobs/versions; teacher text tokenized."""

import numpy as np
import pytest

from klong_jax.data import schema
from klong_jax.data.render import render_trajectory

SYS = {"role": "system", "content": "sys"}
TASK = {"role": "user", "content": "task"}


def test_klong_ids_used_verbatim(fmt, tok):
  end = fmt.end_id
  odd_ids = [500, 7, 7, 900]  # not what tokenizing the content would give
  msgs = [SYS, TASK,
          {"role": "assistant", "content": "ignored text",
           "klong": {"token_ids": odd_ids + [end], "logprobs": [-0.5, -1, -2, -0.1, -0.01],
                     "policy_version": 3}},
          {"role": "tool", "content": "out"},
          {"role": "assistant", "content": "cut", "klong": {
              "token_ids": [11, 12], "logprobs": [-1.5, -2.5], "policy_version": [4, 5]}}]
  f = render_trajectory(msgs, fmt, prefix_messages=2)
  ts = f["turn_starts"]
  a = ts[2] + 1
  assert f["tokens"][a:a + 5].tolist() == odd_ids + [end]
  assert f["loss_mask"][a:a + 5].tolist() == [1] * 5 and f["loss_mask"][ts[2]] == 0
  np.testing.assert_allclose(f["logprobs"][a:a + 5], [-0.5, -1, -2, -0.1, -0.01])
  assert f["policy_version"][a:a + 5].tolist() == [3] * 5
  # The second sampled turn has no stop token: an end token is appended, untrained.
  b = ts[4] + 1
  assert f["tokens"][b:].tolist() == [11, 12, end]
  assert f["loss_mask"][b:].tolist() == [1, 1, 0]
  assert f["policy_version"][b:].tolist() == [4, 5, -1]
  assert f["prefix_end"] == ts[2]
  # Everything outside sampled ids: logprob 0, version -1.
  outside = np.ones(len(f["tokens"]), bool)
  outside[a:a + 5] = outside[b:b + 2] = False
  assert (f["logprobs"][outside] == 0).all() and (f["policy_version"][outside] == -1).all()
  t = schema.validate(dict(f, id="r1", task_id="t"), tok.vocab_size)
  assert t.num_loss_tokens == 7


def test_teacher_text_matches_chat_render(fmt):
  msgs = [SYS, TASK, {"role": "assistant", "content": "hello"}]
  f = render_trajectory(msgs, fmt, prefix_messages=3)
  r = fmt.render(msgs)
  assert f["tokens"].tolist() == r.tokens.tolist()
  assert f["loss_mask"].tolist() == r.loss_mask.tolist()
  assert f["prefix_end"] == len(f["tokens"]) and (f["policy_version"] == -1).all()


def test_klong_length_mismatch_is_named(fmt):
  bad = {"role": "assistant", "content": "", "klong": {"token_ids": [1, 2], "logprobs": [-1.0]}}
  with pytest.raises(ValueError, match="message 1: 'klong' has 2 token_ids but 1 logprobs"):
    render_trajectory([SYS, bad], fmt)
  with pytest.raises(ValueError, match="prefix_messages=5"):
    render_trajectory([SYS], fmt, prefix_messages=5)


def test_render_records_turns_stopped_at_max_tokens(fmt):
  msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": "task"},
          {"role": "assistant", "content": "done", "meta": {"finish_reason": "stop"}},
          {"role": "user", "content": "more"},
          {"role": "assistant", "content": "long unfinish", "meta": {"finish_reason": "length"}},
          {"role": "user", "content": "again"}]
  f = render_trajectory(msgs, fmt, prefix_messages=2)
  ts = f["turn_starts"]
  assert f["cut_turns"] == [[ts[4], ts[5]]]
  assert f["loss_mask"][ts[4]:ts[5]].any()
  t = schema.validate(dict(f, id="r", task_id="t"))
  assert t.cut_turns == [[ts[4], ts[5]]]
  assert np.asarray(t.loss_mask).sum() == np.asarray(f["loss_mask"]).sum()
