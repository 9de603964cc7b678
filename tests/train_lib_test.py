"""Tests of experiments.train_lib on the tiny config (configs/test.py).

The pipeline runs on `tfds.testing.mock_data` (random images and labels read
through `tfds.data_source`, no TensorFlow needed), as in the flax examples.
"""

import json
import re
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from experiments import input_pipeline
from experiments import metrics as metrics_lib
from experiments import steps
from experiments import train_lib
from experiments import workdir as workdir_lib
import lrcr
from tests.input_pipeline_test import random_mnist, write_mnist

tfds = pytest.importorskip("tensorflow_datasets")

NUM_EXAMPLES = 64
SEEDS = 2     # the shared runs train two seeds, vectorized


def _config(**overrides):
  config = test_config.get_config()
  config.data.source = "tfds"
  config.num_seeds = SEEDS
  for key, value in overrides.items():
    config.update_from_flattened_dict({key: value})
  return config


def _train(config, workdir, num_examples=NUM_EXAMPLES):
  with tfds.testing.mock_data(num_examples=num_examples):
    return train_lib.train_and_evaluate(config, str(workdir))


def _metrics_text(workdir):
  with open(os.path.join(workdir, train_lib.METRICS_FILE),
            encoding="utf-8") as f:
    return f.read()


def _records(workdir, seed=None):
  records = [json.loads(line) for line in _metrics_text(workdir).splitlines()]
  return [r for r in records if seed is None or r["seed"] == seed]


def _restore(workdir):
  """(state as nested dicts of arrays, step) of the last checkpoint."""
  ckpt = workdir_lib.Checkpointer(
      os.path.join(workdir, train_lib.CHECKPOINT_DIR))
  step = ckpt.latest_step()
  ckpt.verify(step)
  tree = ocp.StandardCheckpointer().restore(
      os.path.join(ckpt.directory, str(step), "default"))
  return tree["state"], step


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted 40-step run, shared by the tests that compare to it."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = _train(_config(), workdir)
  return workdir, summary


# ---------------------------------------------------------------------------
# The pipeline.


def test_pipeline_writes_the_run_record(reference_run):
  workdir, summary = reference_run
  for name in (train_lib.CONFIG_FILE, train_lib.METRICS_FILE,
               train_lib.FIGURE_FILE, train_lib.SUMMARY_FILE):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  records = _records(workdir)
  assert [(r["step"], r["seed"]) for r in records] == [
      (t, s) for t in range(40) for s in range(SEEDS)]
  for record in records:
    assert tuple(record) == metrics_lib.METRIC_KEYS
    assert np.isfinite(record["loss_base"]) and np.isfinite(record["loss_cr"])
    assert record["skipped_base"] == record["skipped_cr"] == 0
    np.testing.assert_allclose(
        record["learning_rate_cr"],
        record["alpha"] * record["base_learning_rate"], rtol=1e-6)
  # lr(t) = 0.02 * 0.95 ** (t / 100), appendix A.
  np.testing.assert_allclose(records[-1]["base_learning_rate"],
                             0.02 * 0.95 ** 0.39, rtol=1e-6)
  with open(os.path.join(workdir, train_lib.SUMMARY_FILE),
            encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["num_steps"] == 40 and saved["num_seeds"] == SEEDS
  assert [p["seed"] for p in saved["per_seed"]] == list(range(SEEDS))
  assert saved["final_loss_cr"] == pytest.approx(np.median(
      [p["final_loss_cr"] for p in saved["per_seed"]]))
  assert saved["claim"]["num_seeds"] == SEEDS
  assert saved["data"] == f"tfds mnist:train ({NUM_EXAMPLES} examples)"
  assert saved["claim"]["kind"] == "plateau"
  assert summary["data"] == saved["data"]
  _, step = _restore(workdir)
  assert step == 40


def test_both_runs_start_from_the_same_point_on_the_same_batches(
    reference_run):
  for first in _records(reference_run[0])[:SEEDS]:
    assert first["loss_base"] == first["loss_cr"]
    assert first["grad_norm_base"] == first["grad_norm_cr"]


def test_seed_i_is_the_run_of_seed_plus_i(reference_run, tmp_path):
  """Issue 12: the vectorized seed 1 is a one-seed run with config.seed=1."""
  _train(_config(**{"seed": 1, "num_seeds": 1, "training.num_steps": 10}),
         tmp_path)
  alone, vectorized = _records(tmp_path), _records(reference_run[0], seed=1)
  assert [r["seed"] for r in alone] == [1] * 10
  for key in ("loss_base", "loss_cr", "alpha"):
    np.testing.assert_allclose([r[key] for r in alone],
                               [r[key] for r in vectorized[:10]], rtol=1e-4)
  seed0 = _records(reference_run[0], seed=0)
  assert seed0[0]["loss_base"] != vectorized[0]["loss_base"]


def test_the_first_cr_step_matches_an_independent_rebuild(reference_run):
  """Step 0 rebuilt outside the loop: same init, same batch, lrcr.directional
  and the cubic root give the recorded alpha, slope and curvature."""
  records = _records(reference_run[0], seed=0)
  config = _config()
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    ds = input_pipeline.load_dataset(config.data.name, "tfds")
  model = lrcr.MLP((config.model.width,) * config.model.depth, ds.num_classes,
                   kernel_init=lrcr.uniform_init(config.model.init_scale))
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  images = jnp.asarray(ds.images)
  params = model.init(init_key, images[:1])["params"]
  idx = input_pipeline.batch_indices(data_key, 0, ds.num_examples,
                                     config.training.batch_size)
  x, y = images[idx], jnp.asarray(ds.labels)[idx]
  loss = lambda p: lrcr.cross_entropy_loss(model.apply({"params": p}, x), y)
  f0, grads = jax.value_and_grad(loss)(params)
  g = jax.tree.map(lambda a: -config.optimizer.learning_rate * a, grads)
  d = lrcr.directional(model, params, x, y, g)
  alpha = lrcr.cubic_step_length(d.slope, d.curvature, d.sqnorm,
                                 config.optimizer.sigma)
  np.testing.assert_allclose(records[0]["loss_cr"], f0, rtol=1e-6)
  np.testing.assert_allclose(records[0]["slope"], d.slope, rtol=1e-4)
  np.testing.assert_allclose(records[0]["curvature"], d.curvature, rtol=1e-3)
  np.testing.assert_allclose(records[0]["alpha"], alpha, rtol=1e-3)
  assert records[0]["alpha"] > 0
  assert records[5]["loss_base"] != records[5]["loss_cr"]


# ---------------------------------------------------------------------------
# Checkpoint and resume.


def test_resume_after_a_kill_is_bit_identical(reference_run, tmp_path,
                                              monkeypatch):
  workdir = tmp_path / "killed"
  save = train_lib.save_checkpoint
  calls = []

  def killed_before_third_checkpoint(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # after chunk 3's metrics, before its checkpoint
    save(*args, **kwargs)

  monkeypatch.setattr(train_lib, "save_checkpoint",
                      killed_before_third_checkpoint)
  with pytest.raises(KeyboardInterrupt):
    _train(_config(), workdir)
  assert len(_records(workdir)) == 30 * SEEDS  # chunk 3: not checkpointed
  monkeypatch.setattr(train_lib, "save_checkpoint", save)

  summary = _train(_config(), workdir)
  assert summary["resumed_from_step"] == 20
  assert _metrics_text(workdir) == _metrics_text(reference_run[0])
  resumed, _ = _restore(workdir)
  reference, _ = _restore(reference_run[0])
  jax.tree.map(np.testing.assert_array_equal, resumed, reference)


def test_a_flipped_bit_in_a_weight_is_detected(reference_run, tmp_path):
  workdir = tmp_path / "corrupt"
  _train(_config(**{"training.num_steps": 20}), workdir)
  root = workdir / train_lib.CHECKPOINT_DIR / "20"
  victim = max((p for p in root.rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)     # the array data
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x01
  victim.write_bytes(bytes(data))
  with pytest.raises(workdir_lib.CheckpointError,
                     match=rf"{victim}: corrupted.*Delete {root} to resume "
                     "from step 10"):
    _train(_config(), workdir)
  # Following the advice resumes from the step before, as if never corrupted.
  os.system(f"rm -rf '{root}'")
  summary = _train(_config(), workdir)
  assert summary["resumed_from_step"] == 10
  assert _metrics_text(workdir) == _metrics_text(reference_run[0])


class _Bar:
  """tqdm stand-in that records what it would draw."""
  drawn = []

  def __init__(self, *args, **kwargs):
    self.postfix = None

  def set_postfix(self, postfix, refresh=True):
    self.postfix = postfix

  def update(self, n):
    _Bar.drawn.append(self.postfix)

  def close(self):
    pass


def test_a_longer_num_steps_extends_a_finished_run(reference_run, tmp_path,
                                                   monkeypatch):
  _train(_config(**{"training.num_steps": 25}), tmp_path)
  assert len(_records(tmp_path)) == 25 * SEEDS
  monkeypatch.setattr(train_lib.tqdm, "tqdm", _Bar)
  summary = _train(_config(), tmp_path)
  assert summary["resumed_from_step"] == 25
  assert _metrics_text(tmp_path) == _metrics_text(reference_run[0])
  # The bar draws each chunk's own readouts (the median over seeds), not
  # the chunk before's (issue 11, item 10).
  last = _records(tmp_path)[-SEEDS:]
  assert _Bar.drawn[-1]["loss_cr"] == pytest.approx(
      np.median([r["loss_cr"] for r in last]))
  # A finished run is not trained again, and keeps its timings.
  again = _train(_config(), tmp_path)
  assert again["resumed_from_step"] == 40
  for key in ("wall_time_s", "compile_time_s", "steps_per_s"):
    assert again[key] == summary[key], key


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"holds 0 records"),
    ("delete", r"expected step 3, seed 1"),
    ("duplicate", r"expected step 3, seed 1, found step 3, seed 0"),
    ("corrupt", r":8: invalid JSON"),
])
def test_a_damaged_metrics_file_is_refused_on_resume(reference_run, tmp_path,
                                                     damage, message):
  """Issue 11, item 1: the resume checks the metrics against the checkpoint."""
  shutil.copytree(reference_run[0], tmp_path / "run")
  path = tmp_path / "run" / train_lib.METRICS_FILE
  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  lines = {"truncate": lambda: ["".join(lines)[:100]],
           "delete": lambda: lines[:7] + lines[8:],
           "duplicate": lambda: lines[:7] + lines[6:],
           "corrupt": lambda: lines[:7] + ["{oops\n"] + lines[8:]}[damage]()
  path.write_text("".join(lines), encoding="utf-8")
  before = path.read_bytes()
  with pytest.raises(ValueError, match=rf"{path}.*{message}.*new --workdir"):
    _train(_config(**{"training.num_steps": 50}), tmp_path / "run")
  assert path.read_bytes() == before          # left as it was found


def test_a_damaged_config_file_is_named(reference_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  (workdir / train_lib.CONFIG_FILE).write_text('{"name": "te')
  with pytest.raises(ValueError, match=rf"{workdir}/config.json: cannot "
                     "read the saved config.*new --workdir"):
    _train(_config(), workdir)


def test_resuming_with_another_config_is_refused(tmp_path):
  _train(_config(**{"training.num_steps": 10}), tmp_path)
  with pytest.raises(ValueError, match=r"different config.*optimizer\.sigma"
                     r".*new --workdir"):
    _train(_config(**{"optimizer.sigma": 1000.0}), tmp_path)
  with pytest.raises(ValueError, match="past config.training.num_steps=5"):
    _train(_config(**{"training.num_steps": 5}), tmp_path)


def test_checkpoint_round_trip(tmp_path):
  key = jax.random.key(3)
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  tx = steps.make_cr_optimizer(_config().optimizer, 0.1)
  state = steps.TrainState(params, optax.sgd(0.1).init(params), params,
                           tx.init(params))
  ckpt = workdir_lib.Checkpointer(str(tmp_path / "ckpt"))
  train_lib.save_checkpoint(ckpt, state, 7, key)
  fresh = jax.tree.map(jnp.zeros_like, state)
  restored, step, restored_key = train_lib.restore_checkpoint(
      ckpt, fresh, jax.random.key(0))
  assert step == 7
  assert np.array_equal(jax.random.key_data(restored_key),
                        jax.random.key_data(key))
  jax.tree.map(np.testing.assert_array_equal, restored, state)


# ---------------------------------------------------------------------------
# Non-finite steps.


def test_skip_leaves_a_nonfinite_step_out(tmp_path, caplog):
  summary = _train(_config(**{"training.inject_nan_at_step": 13,
                              "training.num_steps": 20}), tmp_path)
  assert "skipped 4 non-finite step(s)" in caplog.text    # 2 runs x 2 seeds
  assert "13 (CR, seed 1)" in caplog.text
  records = _records(tmp_path, seed=1)
  bad = records[13]
  assert bad["loss_base"] is None and bad["loss_cr"] is None
  assert bad["skipped_base"] == bad["skipped_cr"] == 1
  for record in records[:13] + records[14:]:
    assert record["skipped_base"] == record["skipped_cr"] == 0
    assert np.isfinite(record["loss_base"]) and np.isfinite(record["loss_cr"])
  state, _ = _restore(tmp_path)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  assert summary["nonfinite_steps_base"] == summary["nonfinite_steps_cr"] \
      == SEEDS


def test_stop_raises_after_saving_the_last_finite_state(tmp_path):
  config = _config(**{"training.inject_nan_at_step": 13,
                      "training.nonfinite": "stop"})
  with pytest.raises(FloatingPointError,
                     match=r"step 13 in the base run of seed 0, .*the CR run "
                     r"of seed 1.*new --workdir"):
    _train(config, tmp_path)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [t for t in range(14)
                                          for _ in range(SEEDS)]
  assert records[-1]["skipped_base"] == 1
  state, step = _restore(tmp_path)
  assert step == 13
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  assert os.path.exists(tmp_path / train_lib.SUMMARY_FILE)


# ---------------------------------------------------------------------------
# Bad configs and data.


@pytest.mark.parametrize("key, value, match", [
    ("optimizer.sigma", 0.0,
     r"config\.optimizer\.sigma=0\.0: must be a finite number > 0"),
    ("optimizer.name", "lbfgs", r"Unknown optimizer 'lbfgs'.*sgd, adagrad"),
    ("optimizer.learning_rate", 0.0, r"config\.optimizer\.learning_rate"),
    ("optimizer.curvature", "exact", r"config\.optimizer\.curvature"),
    ("optimizer.averaging", "median", r"config\.optimizer\.averaging"),
    ("model.init_scale", 0.0, r"config\.model\.init_scale"),
    ("training.chunk_size", 0, r"config\.training\.chunk_size"),
    ("training.nonfinite", "ignore", r"config\.training\.nonfinite"),
    ("claim_kind", "huge", r"config\.claim_kind"),
    ("num_seeds", 0, r"config\.num_seeds=0: out of range.*an integer >= 1"),
])
def test_bad_configs_are_refused_up_front(tmp_path, key, value, match):
  with pytest.raises(ValueError, match=match):
    train_lib.train_and_evaluate(_config(**{key: value}), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_a_batch_larger_than_the_data_is_refused(tmp_path):
  with pytest.raises(ValueError, match=r"config\.training\.batch_size.*20"):
    _train(_config(**{"training.batch_size": 32}), tmp_path / "run",
           num_examples=20)
  assert not (tmp_path / "run").exists()     # no empty workdir left behind


def test_nonfinite_curvature_is_a_nonfinite_step(tmp_path, monkeypatch):
  """Issue 11, item 5: where the transform flags the curvature as not finite
  (`info.finite`; it then takes alpha = 0, a frozen run), the loop counts a
  non-finite step, and `stop` fires."""
  make_cr_step = train_lib.steps.make_cr_step

  def not_finite(model, tx, options):
    step = make_cr_step(model, tx, options)

    def flagged(params, opt_state, x, y):
      out = step(params, opt_state, x, y)
      info = optax.tree.get(out.opt_state, "info")
      info = info._replace(finite=jax.tree.map(jnp.zeros_like, info.finite))
      return out._replace(opt_state=optax.tree.set(out.opt_state, info=info))
    return flagged

  monkeypatch.setattr(train_lib.steps, "make_cr_step", not_finite)
  config = _config(**{"training.nonfinite": "stop", "training.num_steps": 10,
                      "num_seeds": 1})
  with pytest.raises(FloatingPointError, match=r"step 0 in the CR run of "
                     "seed 0"):
    _train(config, tmp_path / "stop")
  summary = _train(_config(**{"training.num_steps": 10, "num_seeds": 1}),
                   tmp_path / "skip")
  assert summary["nonfinite_steps_cr"] == 10
  assert summary["nonfinite_steps_base"] == 0


def test_batches_are_a_function_of_the_step():
  key = jax.random.key(0)
  n, b = 20, 8   # two batches per epoch; 4 indices left out each epoch
  batch = lambda t: np.asarray(input_pipeline.batch_indices(key, t, n, b))
  epoch0 = np.concatenate([batch(0), batch(1)])
  epoch1 = np.concatenate([batch(2), batch(3)])
  assert len(set(epoch0.tolist())) == 2 * b and epoch0.max() < n
  assert not np.array_equal(epoch0, epoch1)
  jitted = jax.jit(input_pipeline.batch_indices, static_argnums=(2, 3))
  np.testing.assert_array_equal(jitted(key, jnp.int32(3), n, b), batch(3))


# ---------------------------------------------------------------------------
# Options through the whole pipeline.


def test_schedule_decays_by_095_per_100_steps():
  config = _config(**{"optimizer.learning_rate": 0.1})
  schedule = steps.make_schedule(config.optimizer)
  np.testing.assert_allclose(schedule(100), 0.095, rtol=1e-6)
  config.optimizer.decay_staircase = True
  np.testing.assert_allclose(steps.make_schedule(config.optimizer)(150),
                             0.095, rtol=1e-6)


def test_adagrad_uses_the_tf1_defaults():
  params = {"w": jnp.ones(3)}
  config = _config(**{"optimizer.name": "adagrad"})
  tx = steps.make_base_optimizer(config.optimizer, 1.0)
  updates, _ = tx.update({"w": jnp.full(3, 0.3)}, tx.init(params))
  # -lr g / sqrt(0.1 + g^2 + 1e-7)
  np.testing.assert_allclose(updates["w"], -0.3 / np.sqrt(0.19 + 1e-7),
                             rtol=1e-6)


@pytest.mark.parametrize("overrides", [
    {"optimizer.name": "adagrad", "optimizer.granularity": "layer"},
    {"optimizer.name": "adam", "optimizer.adaptive_sigma": True},
    {"optimizer.name": "rmsprop", "optimizer.granularity": "variable"},
    {"optimizer.curvature_batch_size": 4, "optimizer.curvature": "lowrank",
     "optimizer.granularity": "layer"},
    {"optimizer.name": "adadelta", "optimizer.curvature": "hvp"},
])
def test_cr_options_train(tmp_path, overrides):
  config = _config(**overrides, **{"training.num_steps": 20,
                                   "training.nonfinite": "stop"})
  summary = _train(config, tmp_path)
  records = _records(tmp_path)
  assert summary["stopped"] is None
  assert all(np.isfinite(r["loss_cr"]) and r["alpha"] >= 0 for r in records)
  assert any(r["alpha"] > 0 for r in records)
  sigmas = {r["sigma"] for r in records}
  assert (len(sigmas) > 1) == bool(config.optimizer.adaptive_sigma)


def test_curvature_every_reuses_alpha(tmp_path):
  _train(_config(**{"optimizer.curvature_every": 5,
                    "training.num_steps": 20}), tmp_path)
  alphas = [r["alpha"] for r in _records(tmp_path, seed=0)]
  assert all(alphas[i] == alphas[i - i % 5] for i in range(20))
  assert len(set(alphas)) > 1


@pytest.mark.parametrize("averaging", ["mean_alpha", "mean_alpha_g"])
def test_section_3_1_averagings_train(tmp_path, averaging):
  _train(_config(**{"optimizer.averaging": averaging,
                    "training.num_steps": 10}), tmp_path)
  records = _records(tmp_path)
  assert all(np.isfinite(r["loss_cr"]) and r["alpha"] >= 0 for r in records)
  assert any(r["alpha_cv"] > 0 for r in records)   # per-sample alphas differ


def test_averaging_needs_plain_sgd(tmp_path):
  with pytest.raises(ValueError, match="plain SGD"):
    _train(_config(**{"optimizer.averaging": "mean_alpha",
                      "optimizer.name": "adam"}), tmp_path)


# ---------------------------------------------------------------------------
# Issue 21: the workdir holds one run, on one dataset, with one config.


def _write_files(directory, seed, n=NUM_EXAMPLES):
  os.makedirs(directory, exist_ok=True)
  write_mnist(directory, "train", *random_mnist(n, seed))
  return str(directory)


def _files_config(data_dir, **overrides):
  return _config(**{"data.source": "files", "data.path": str(data_dir),
                    **overrides})


def test_changed_data_is_refused_on_resume(tmp_path, capsys):
  """Item 2: the files replaced between two invocations."""
  data_dir = _write_files(tmp_path / "data", seed=1)
  workdir = tmp_path / "run"
  train_lib.train_and_evaluate(
      _files_config(data_dir, **{"training.num_steps": 10}), str(workdir))
  saved = json.loads((workdir / train_lib.DATA_FILE).read_text())
  assert saved[0]["source"] == "files" and saved[0]["path"] == data_dir
  assert saved[0]["num_examples"] == NUM_EXAMPLES
  before = _metrics_text(workdir)
  _write_files(data_dir, seed=2)                    # other images, same names
  with pytest.raises(ValueError, match=(
      rf"{workdir}/data.json: the run in {workdir} trained on other data "
      rf"\(saved: files {data_dir}, 64 examples, sha256 "
      rf"{saved[0]['sha256'][:16]}; now: files {data_dir}, 64 examples, "
      r"sha256 [0-9a-f]{16}\).*new --workdir.*--allow_new_data")):
    train_lib.train_and_evaluate(
        _files_config(data_dir, **{"training.num_steps": 20}), str(workdir))
  assert _metrics_text(workdir) == before          # nothing written
  summary = train_lib.train_and_evaluate(
      _files_config(data_dir, **{"training.num_steps": 20}), str(workdir),
      allow_new_data=True)
  assert [c["from_step"] for c in summary["data_changes"]] == [10]
  assert summary["data_fingerprint"]["sha256"] != saved[0]["sha256"]
  assert "already finished" not in capsys.readouterr().out


def test_new_data_is_recorded_from_the_step_actually_resumed(tmp_path):
  """The manifest lists step 20, but its checkpoint is gone: the run resumes
  from step 10, and the data change is recorded from step 10."""
  data_dir = _write_files(tmp_path / "data", seed=1)
  workdir = tmp_path / "run"
  for num_steps in (10, 20):
    train_lib.train_and_evaluate(
        _files_config(data_dir, **{"training.num_steps": num_steps}),
        str(workdir))
  shutil.rmtree(workdir / train_lib.CHECKPOINT_DIR / "20")
  _write_files(data_dir, seed=2)
  summary = train_lib.train_and_evaluate(
      _files_config(data_dir, **{"training.num_steps": 30}), str(workdir),
      allow_new_data=True)
  assert summary["resumed_from_step"] == 10
  assert [c["from_step"] for c in summary["data_changes"]] == [10]
  saved = json.loads((workdir / train_lib.DATA_FILE).read_text())
  assert [d["from_step"] for d in saved] == [0, 10]


def test_the_same_data_from_another_source_resumes(reference_run, tmp_path):
  """The fingerprint hashes the arrays: the source may change (`auto`)."""
  workdir = tmp_path / "run"
  shutil.copytree(reference_run[0], workdir)
  with open(workdir / train_lib.DATA_FILE, encoding="utf-8") as f:
    record = json.load(f)
  record[0].update(source="files", path="/elsewhere")
  (workdir / train_lib.DATA_FILE).write_text(json.dumps(record))
  summary = _train(_config(), workdir)
  assert summary["already_finished"] and not summary["data_changes"]


def test_a_hand_edited_config_json_is_refused(reference_run, tmp_path):
  """Item 3: batch_size 8 -> 16 in config.json, then an extension."""
  shutil.copytree(reference_run[0], tmp_path / "run")
  path = tmp_path / "run" / train_lib.CONFIG_FILE
  saved = json.loads(path.read_text())
  saved["training"]["batch_size"] = 16
  path.write_text(json.dumps(saved))
  for batch_size in (8, 16):
    with pytest.raises(ValueError, match=(
        rf"{path}: disagrees with the config the checkpoints.*"
        r"training\.batch_size: 8 \(checkpoint\) vs 16 \(config\.json\)")):
      _train(_config(**{"training.batch_size": batch_size,
                        "training.num_steps": 50}), tmp_path / "run")


def test_an_early_failure_leaves_a_workdir_that_just_works(tmp_path):
  """Item 4: num_devices=4 on one device writes nothing; a workdir whose
  start failed after writing (a full disk) holds no completed step, so a
  corrected rerun, even with another config, starts afresh."""
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"num_devices=4: 1 device\(s\) are "
                     "available"):
    _train(_config(**{"training.num_devices": 4}), workdir)
  assert not workdir.exists()
  os.makedirs(workdir / train_lib.CHECKPOINT_DIR / "10")
  (workdir / train_lib.METRICS_FILE).write_text('{"step": 0, "se')
  (workdir / train_lib.CONFIG_FILE).write_text('{"name": "other run"}')
  summary = _train(_config(**{"training.num_steps": 20}), workdir)
  assert summary["resumed_from_step"] == 0 and summary["num_steps"] == 20


def test_a_full_disk_names_the_file_and_resumes_bit_identically(
    reference_run, tmp_path, monkeypatch):
  """Item 6: ENOSPC in the middle of appending chunk 3's metrics."""
  workdir = tmp_path / "full"
  lines = train_lib.metrics_lib._lines  # pylint: disable=protected-access
  calls = []

  def full_disk(records):
    calls.append(1)
    if len(calls) == 4:     # the resume's rewrite, then chunks 1, 2 and 3
      with open(workdir / train_lib.METRICS_FILE, "a", encoding="utf-8") as f:
        f.write('{"step": 20, "seed"')           # a torn line
      raise OSError(28, "No space left on device")
    return lines(records)

  monkeypatch.setattr(train_lib.metrics_lib, "_lines", full_disk)
  with pytest.raises(OSError, match=rf"{workdir}/metrics\.jsonl: writing "
                     r"failed \(No space left on device\)\. The run can "
                     "resume"):
    _train(_config(), workdir)
  monkeypatch.setattr(train_lib.metrics_lib, "_lines", lines)
  summary = _train(_config(), workdir)
  assert summary["resumed_from_step"] == 20
  assert _metrics_text(workdir) == _metrics_text(reference_run[0])


def test_a_workdir_that_is_a_file_is_refused_before_loading(tmp_path,
                                                            monkeypatch):
  (tmp_path / "f").write_text("x")
  monkeypatch.setattr(input_pipeline, "load_dataset", None)   # not called
  with pytest.raises(ValueError, match=r"is a file, not a directory"):
    train_lib.train_and_evaluate(_config(), str(tmp_path / "f"))


def test_a_finished_run_says_so(reference_run, tmp_path, capsys):
  shutil.copytree(reference_run[0], tmp_path / "run")
  capsys.readouterr()
  summary = _train(_config(), tmp_path / "run")
  out = capsys.readouterr().out
  assert "test: already finished at step 40, nothing to train" in out
  assert summary["already_finished"] and "0 steps" not in out


@pytest.mark.parametrize("key, value, match", [
    ("optimizer.learning_rate", 1e-50, r"rounds to 0 in float32"),
    ("optimizer.learning_rate", 1e39, r"rounds to inf in float32"),
    ("optimizer.learning_rate", 1e-20, r"out of range.*\[1e-10, 10000\]"),
    ("optimizer.sigma", 1e-45, r"rounds to 1\.4013e-45 in float32"),
    ("optimizer.sigma", 1e39, r"rounds to inf in float32"),
    ("optimizer.sigma", 1e30, r"out of range.*\[1e-08, 1e\+12\]"),
    ("optimizer.decay_rate", float("nan"), r"must be a finite number > 0"),
    ("optimizer.decay_rate", -1.0, r"must be a finite number > 0"),
    ("optimizer.decay_rate", 1e-30, r"with decay_steps=100 it takes the "
     r"learning rate from 0\.02 to "
     r"1e-14 by step 40.*decay_rate closer to 1"),
    ("optimizer.decay_steps", 0, r"out of range.*>= 1"),
    ("model.init_scale", 1e-45, r"rounds to 1\.4013e-45 in float32"),
    ("seed", -1, r"out of range"),
    ("num_seeds", 0, r"out of range.*an integer >= 1"),
    ("training.scan_unroll", 0, r"must be an integer >= 1"),
    ("model.input_shape", (28, 0), r"must be a tuple of integers >= 1"),
])
def test_float32_aware_validation(key, value, match):
  """Item 5: every numeric value in the range the float32 run can use."""
  with pytest.raises(ValueError,
                     match=rf"config\.{key}={re.escape(repr(value))}: {match}"):
    train_lib.check_config(_config(**{key: value}))
