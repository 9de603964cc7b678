"""source="tfds": tensorflow-datasets `mnist` / `cifar10`.

Read through `tfds.data_source` (array_record), which needs no TensorFlow.
`data_dir` is the TFDS data_dir, so a prepared TFDS directory copied onto an
air-gapped machine works. Data prepared in another format (tfrecord) is read
with `tfds.load` only when TensorFlow is importable. Unprepared data is
downloaded only when the download host answers within
`NETWORK_PROBE_TIMEOUT_S` seconds. Examples are decoded one by one (PIL).
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

# Seconds to wait for the download host before deciding there is no network.
NETWORK_PROBE_TIMEOUT_S = 3.0


def _unavailable(where: Any, problem: str, fix: str = "") -> ds.DataError:
  return ds.error(where, problem, fix, kind=ds.TfdsUnavailable)


def offline_hint(spec: ds.Spec) -> str:
  if spec.name == "mnist":
    return "use source='files' (with path) or source='mnist_5k'"
  return "use source='files' with path=/path/to/" + files.CIFAR_DIRNAME


def load(spec: ds.Spec, split: str, data_dir: str | None,
         download: bool) -> ds.Dataset:
  """TFDS data through data_source (no TensorFlow), preparing it if allowed.

  Raises:
    TfdsUnavailable: when TFDS has no data for the request.
    DataError: for data that exists but is bad, or a bad request.
  """
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
    builder = _builder(tfds, spec, data_dir, failure)
    if builder.is_prepared():
      return _load_not_random_access(tfds, builder, spec, split, data_dir,
                                     failure)
    source = _prepare(tfds, builder, spec, split, data_dir, download)
  images, labels = _read_data_source(source, spec, what)
  return ds.to_dataset(spec, images, labels,
                       f"{what} ({labels.shape[0]} examples)", "tfds",
                       data_dir or "")


def _builder(tfds: Any, spec: ds.Spec, data_dir: str | None,
             failure: str) -> Any:
  try:
    builder = tfds.builder(spec.name, data_dir=data_dir)
    builder.is_prepared()
  except Exception as err:  # pylint: disable=broad-except
    raise _unavailable(f"tfds {spec.name}", f"{failure}; tfds.builder("
                       f"{spec.name!r}, data_dir={data_dir!r}) also failed: "
                       f"{type(err).__name__}: {err}") from err
  return builder


def _load_not_random_access(tfds: Any, builder: Any, spec: ds.Spec,
                            split: str, data_dir: str | None,
                            failure: str) -> ds.Dataset:
  """Prepared data data_source could not read: via TensorFlow, else an error."""
  where = str(builder.data_dir)
  file_format = str(getattr(builder.info.file_format, "value", "unknown"))
  if file_format in ("array_record", "parquet"):
    # Readable without TF, so the request itself is bad (e.g. unknown split).
    raise ds.error(where, failure)
  if importlib.util.find_spec("tensorflow") is not None:
    return _load_with_tf(tfds, spec, split, data_dir)
  raise _unavailable(where, f"prepared in the {file_format} format, which "
                     "needs TensorFlow to read, and TensorFlow is not "
                     "installed", "re-prepare it with download_and_prepare("
                     f"file_format='array_record'), or {offline_hint(spec)}")


def _prepare(tfds: Any, builder: Any, spec: ds.Spec, split: str,
             data_dir: str | None, download: bool) -> Any:
  """The data source of the split, downloaded and prepared when allowed."""
  where = str(builder.data_dir)
  if data_dir is not None and files.holds_files(data_dir):
    raise ds.error(data_dir, "holds raw distribution files, not a prepared "
                   "TFDS data_dir", "use source='files' "
                   "(--config.data.source=files)")
  fix = f"copy a prepared TFDS data_dir and pass it as path, or " \
        f"{offline_hint(spec)}"
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
                       f"instead, {offline_hint(spec)}") from err


def _read_data_source(source: Any, spec: ds.Spec,
                      what: str) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a TFDS data source -> (uint8 [N,H,W,C], int64 [N])."""
  n = len(source)
  if n == 0:
    raise ds.error(what, "the split is empty")
  images = np.empty((n,) + spec.image_shape, np.uint8)
  labels = np.empty((n,), np.int64)
  for i in range(n):
    example = source[i]
    image = np.asarray(example["image"])
    if image.shape != spec.image_shape or image.dtype != np.uint8:
      raise ds.error(what, f"example {i} has an image of "
                     f"{ds.describe_array(image)}, expected uint8 "
                     f"{spec.image_shape}; wrong image shape")
    images[i] = image
    labels[i] = int(example["label"])
  ds.check_labels(labels, ds.NUM_CLASSES, what)
  return images, labels


def _load_with_tf(tfds: Any, spec: ds.Spec, split: str,
                  data_dir: str | None) -> ds.Dataset:
  """Reads non-random-access (tfrecord) TFDS data with TensorFlow."""
  what = f"tfds {spec.name}:{split}" + (f" from {data_dir}" if data_dir else "")
  arrays = tfds.as_numpy(tfds.load(spec.name, split=split, data_dir=data_dir,
                                   batch_size=-1, download=False))
  images, labels = np.asarray(arrays["image"]), np.asarray(arrays["label"])
  if images.shape[1:] != spec.image_shape or images.dtype != np.uint8:
    raise ds.error(what, f"images are a {ds.describe_array(images)}, expected "
                   f"uint8 [N, {', '.join(map(str, spec.image_shape))}]; "
                   "wrong image shape")
  if labels.shape != (images.shape[0],):
    raise ds.error(what, f"{images.shape[0]} images but labels of shape "
                   f"{labels.shape}")
  ds.check_labels(labels, ds.NUM_CLASSES, what)
  return ds.to_dataset(spec, images, labels, f"{what} ({labels.shape[0]} "
                       "examples, read with TensorFlow)", "tfds",
                       data_dir or "")


def network_problem(host: str) -> str | None:
  """Why host:443 (or the HTTPS proxy) is unreachable; None if it answers.

  DNS lookups ignore socket timeouts, so the probe runs in a daemon thread and
  is abandoned after NETWORK_PROBE_TIMEOUT_S seconds.
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
