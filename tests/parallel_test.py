"""Data parallelism over 4 host devices gives single-device numbers."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_data_parallel_matches_single_device(tmp_path):
  # The session's XLA_FLAGS (tests/conftest.py), and 4 host devices.
  flags = " ".join([os.environ.get("XLA_FLAGS", ""),
                    "--xla_force_host_platform_device_count=4"]).strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "scripts",
                                    "data_parallel_check.py"), str(tmp_path)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])
  assert result["devices"] == 4
  four, one = np.array(result["metrics_4"]), np.array(result["metrics_1"])
  assert four.shape == one.shape == (30, 5)
  np.testing.assert_allclose(four, one, rtol=1e-5, atol=1e-7)
  single, sharded = result["directional"]
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  np.testing.assert_allclose(*result["gram"], rtol=1e-5)
  assert "data" in result["input_sharding"]
