"""Serving bundle + policy checkpoints; a server started from a bundle alone under loopback load."""

import concurrent.futures
import os
import subprocess
import sys
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from klong_jax.inference import export, reload
from klong_jax.launch.experiment import free_port


def test_policy_roundtrip_versions_and_bf16(tiny_model, tmp_path):
  root = tmp_path / "policy"
  reload.save_policy(root, 3, tiny_model)
  reload.save_policy(root, 10, tiny_model, dtype=jnp.bfloat16)
  (root / ".tmp-11-abcd").mkdir()  # An unfinished write is never a version.
  assert reload.list_versions(root) == [3, 10] and reload.latest_version(root) == 10
  with pytest.raises(FileExistsError, match="immutable"):
    reload.save_policy(root, 3, tiny_model)
  ref = reload.params_dict(tiny_model)  # Params + the router's ExpertBias.
  assert "expert_bias_e" in str(jax.tree_util.tree_structure(ref))
  exact = reload.load_policy(root / "3", tiny_model)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), exact,
               ref)
  cast = reload.load_policy(root / "10", tiny_model)
  jax.tree.map(lambda a, b: (np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-2, atol=1e-6),
                             np.testing.assert_equal(a.dtype, b.dtype)), cast, ref)
  reload.save_policy(root, 12, nnx.state(tiny_model, nnx.Param))  # Trainer-style Params only.
  params_only = reload.load_policy(root / "12", nnx.state(tiny_model, nnx.Not(nnx.RngState)))
  assert "expert_bias_e" not in str(jax.tree_util.tree_structure(params_only))
  with pytest.raises(FileNotFoundError, match="not a policy checkpoint"):
    reload.load_policy(tmp_path, tiny_model)


@pytest.mark.slow
@pytest.mark.subprocess
def test_server_from_bundle_under_load(tiny_model, tiny_cfg, tok, tmp_path):
  bundle = export.write_bundle(tmp_path / "bundle", tiny_model, tiny_cfg, tok.path, version=4,
                               bf16=True, model_name="klong-tiny")
  b = export.load_bundle(bundle)
  assert b.policy_version == 4 and b.model_config == tiny_cfg and b.dtype == "bfloat16"
  with pytest.raises(FileNotFoundError, match="not a serving bundle"):
    export.load_bundle(tmp_path)
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "klong_jax.inference.server", f"--bundle={bundle}",
       f"--port={port}", "--max_batch=8", "--max_len=128", "--min_prefill_bucket=64",
       "--min_prefill_rows=8"], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      assert time.monotonic() < deadline, "server from bundle did not come up"
      try:
        if httpx.get(url + "/health", timeout=1).status_code == 200:
          break
      except httpx.HTTPError:
        time.sleep(0.3)
    assert httpx.get(url + "/health").json()["policy_version"] == 4
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def one(i: int) -> int:
      if i % 3 == 0:
        r = client.chat.completions.create(
            model="klong-tiny", messages=[{"role": "user", "content": f"task {i}"}],
            max_tokens=4 + i % 13, temperature=1.0, seed=i)
        return len(r.choices[0].model_extra["token_ids"])
      if i % 3 == 1:
        r = client.completions.create(model="klong-tiny", prompt=f"step {i}:" * (1 + i % 3),
                                      max_tokens=3 + i % 7, temperature=0)
        return len(r.choices[0].model_extra["token_ids"])
      stream = client.completions.create(model="klong-tiny", prompt="go", max_tokens=5,
                                         stream=True)
      return sum(len(c.choices[0].model_extra.get("token_ids") or []) for c in stream
                 if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      counts = list(pool.map(one, range(36)))  # Raises if any request failed.
    assert len(counts) == 36 and all(c >= 1 for c in counts)
    metrics = httpx.get(url + "/metrics").text
    assert 'status="500"' not in metrics
  finally:
    proc.terminate()
    proc.wait(timeout=30)
