"""source="tfds": tensorflow-datasets through `tfds.data_source`, no TensorFlow.

A prepared data_dir copied onto an air-gapped machine works; tfrecord data
needs TensorFlow; unprepared data is downloaded if the host answers in time.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import urllib.parse
from typing import Any

import numpy as np

from experiments.input_pipeline import dataset as ds
from experiments.input_pipeline import files

NETWORK_PROBE_TIMEOUT_S = 3.0  # for the download host, else "no network"


def _unavailable(where: Any, problem: str, fix: str = "") -> ds.DataError:
  return ds.error(where, problem, fix, kind=ds.TfdsUnavailable)


def _offline_hint(spec: ds.Spec) -> str:
  if spec.name == "mnist":
    return "use source='files' (with path) or source='mnist_5k'"
  return "use source='files' with path=/path/to/" + files.CIFAR_DIRNAME


def load(spec: ds.Spec, split: str, data_dir: str | None,
         download: bool) -> ds.Dataset:
  """TFDS data, prepared if allowed; TfdsUnavailable if TFDS has none."""
  if data_dir is not None:
    ds.require_directory(
        data_dir, "TFDS data_dir; create it to let TFDS download into it")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise _unavailable("tensorflow-datasets", "not installed",
                       "pip install tensorflow-datasets") from err
  what = f"tfds {spec.name}:{split}" + (f" from {data_dir}" if data_dir else "")
  try:
    source = tfds.data_source(spec.name, split=split, data_dir=data_dir,
                              download=False)
  except Exception as err:  # pylint: disable=broad-except
    failure = (f"tfds.data_source({spec.name!r}, split={split!r}, "
               f"data_dir={data_dir!r}) failed: {type(err).__name__}: {err}")
    try:
      builder = tfds.builder(spec.name, data_dir=data_dir)
      prepared = builder.is_prepared()
    except Exception as err2:  # pylint: disable=broad-except
      raise _unavailable(f"tfds {spec.name}", f"{failure}; tfds.builder("
                         f"{spec.name!r}, data_dir={data_dir!r}) also "
                         f"failed: {type(err2).__name__}: {err2}") from err2
    if prepared:
      return _load_not_random_access(tfds, builder, spec, split, data_dir,
                                     what, failure)
    source = _prepare(tfds, builder, spec, split, data_dir, download)
  n = len(source)
  if n == 0:
    raise ds.error(what, "the split is empty")
  examples = [source[i] for i in range(n)]             # decoded one by one
  for i, example in enumerate(examples):
    ds.check_images(np.asarray(example["image"])[None], spec.image_shape,
                    f"{what}, example {i}", spec)
  images = np.stack([np.asarray(e["image"]) for e in examples])
  labels = np.array([int(e["label"]) for e in examples], np.int64)
  return ds.to_dataset(spec, images, labels, what, f"{what} ({n} examples)",
                       "tfds", data_dir or "")


def _load_not_random_access(tfds: Any, builder: Any, spec: ds.Spec,
                            split: str, data_dir: str | None, what: str,
                            failure: str) -> ds.Dataset:
  """Prepared data that data_source cannot read: via TensorFlow, or an error."""
  where = str(builder.data_dir)
  file_format = str(getattr(builder.info.file_format, "value", "unknown"))
  if file_format in ("array_record", "parquet"):
    # Readable without TF, so the request itself is bad (e.g. unknown split).
    raise ds.error(where, failure)
  if importlib.util.find_spec("tensorflow") is not None:   # tfrecord data
    arrays = tfds.as_numpy(tfds.load(spec.name, split=split, batch_size=-1,
                                     data_dir=data_dir, download=False))
    return ds.to_dataset(spec, np.asarray(arrays["image"]),
                         np.asarray(arrays["label"]), what, f"{what} ("
                         f"{len(arrays['label'])} examples, read with "
                         "TensorFlow)", "tfds", data_dir or "")
  raise _unavailable(where, f"prepared in the {file_format} format, which "
                     "needs TensorFlow to read, and TensorFlow is not "
                     "installed", "re-prepare it with download_and_prepare("
                     f"file_format='array_record'), or {_offline_hint(spec)}")


def _prepare(tfds: Any, builder: Any, spec: ds.Spec, split: str,
             data_dir: str | None, download: bool) -> Any:
  """The data source of the split, downloaded and prepared when allowed."""
  where = str(builder.data_dir)
  if data_dir is not None and files.holds_files(data_dir):
    raise ds.error(data_dir, "holds raw distribution files, not a prepared "
                   "TFDS data_dir", "use source='files' "
                   "(--config.data.source=files)")
  fix = f"copy a prepared TFDS data_dir and pass it as path, or " \
        f"{_offline_hint(spec)}"
  if not download:
    raise _unavailable(where, "not prepared and download=False", fix)
  problem = network_problem(spec.download_host)
  if problem is not None:
    raise _unavailable(where, f"not prepared, and the download host "
                       f"{spec.download_host} is unreachable ({problem}), so "
                       "no download was tried", fix)
  try:
    builder.download_and_prepare(file_format="array_record")
    return tfds.data_source(spec.name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as err:  # pylint: disable=broad-except
    raise _unavailable(where, "not prepared, and download_and_prepare("
                       f"file_format='array_record') failed: "
                       f"{type(err).__name__}: {err}",
                       f"instead, {_offline_hint(spec)}") from err


def network_problem(host: str) -> str | None:
  """Why host:443 (or the HTTPS proxy) is unreachable; None if it answers.

  DNS ignores socket timeouts, so the probe is a thread abandoned in time.
  """
  address = (host, 443)
  proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
  if proxy:
    parsed = urllib.parse.urlsplit(proxy if "://" in proxy else "//" + proxy)
    if parsed.hostname:
      address = (parsed.hostname, parsed.port or 80)
  outcome = []

  def probe() -> None:
    try:
      with socket.create_connection(address, timeout=NETWORK_PROBE_TIMEOUT_S):
        outcome.append(None)
    except OSError as err:
      outcome.append(f"{type(err).__name__}: {err}")

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(NETWORK_PROBE_TIMEOUT_S)
  if not outcome:
    return f"no answer within {NETWORK_PROBE_TIMEOUT_S:g} s"
  return outcome[0]
