"""Tiny split-SFT on synthetic trajectories: loss ends well below the unigram baseline."""

import pytest

from klong_jax.train import sft
from tests.train import sft_testlib as lib

pytestmark = pytest.mark.slow  # A full split-SFT run.

STEPS = 36


def test_loss_falls_well_below_unigram_baseline(tmp_path, capsys):
  env = lib.make_env(tmp_path, num=48)
  out = sft.run(lib.config(env, STEPS, every=STEPS), str(tmp_path / "run"))
  losses = [h["ce"] for h in out["history"]]
  final = sum(losses[-4:]) / 4
  with capsys.disabled():
    print(f"\nSFT tiny: unigram baseline {env['unigram']:.3f} nats/token, first CE "
          f"{losses[0]:.3f}, final CE (mean of last 4) {final:.3f}")
  assert losses[0] > env["unigram"]            # starts above the baseline (~ln 512)
  assert final < 0.8 * env["unigram"]          # and ends well below it
  assert out["rejected_records"] == 0
