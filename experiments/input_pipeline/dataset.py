"""What every source shares: the Dataset, its specs and the error helpers."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import numpy as np

NAMES = ("mnist", "cifar10")
SPLITS = ("train", "test")  # the splits the "files" and "mnist_5k" sources know
NUM_CLASSES = 10
AGAIN = "copy or download it again"


class DataError(ValueError):
  """Bad data or a bad data config: the message names the file and the fix."""


class TfdsUnavailable(DataError):
  """TFDS has no data for the request (not a defect in data that exists)."""


def error(where: Any, problem: str, fix: str = "",
          kind: type[DataError] = DataError) -> DataError:
  """The one shape of every data error: "<where>: <problem>[; <fix>]."."""
  message = f"{where}: {problem.rstrip('.')}"
  return kind(message + (f"; {fix.rstrip('.')}." if fix else "."))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a dataset looks like."""

  name: str
  title: str
  image_shape: tuple[int, int, int]     # (H, W, C)
  download_host: str

  @property
  def dim(self) -> int:
    return int(np.prod(self.image_shape))


SPECS = {
    "mnist": Spec("mnist", "MNIST", (28, 28, 1), "storage.googleapis.com"),
    "cifar10": Spec("cifar10", "CIFAR-10", (32, 32, 3), "www.cs.toronto.edu"),
}


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no plain `==`
class Dataset:
  """A whole split in memory."""

  images: np.ndarray    # [N, D] float32 in [0, 1], each image flattened HWC
  labels: np.ndarray    # [N] int32 in [0, num_classes)
  num_classes: int
  name: str             # "mnist" or "cifar10"
  description: str      # which data, e.g. "tfds mnist:train (60000 ...)"
  source: str           # "tfds", "files" or "mnist_5k"
  path: str = ""        # the directory read

  def __post_init__(self):
    where = f"Dataset({self.description!r})"
    for x, what, dtype, shape in ((self.images, "images", np.float32, "N, D"),
                                  (self.labels, "labels", np.int32, "N")):
      if not (isinstance(x, np.ndarray) and x.dtype == dtype and
              x.ndim == len(shape.split(","))):
        raise error(where, f"{what} must be a [{shape}] {np.dtype(dtype)} "
                    f"array, got {describe_array(x)}")
    if self.num_classes < 1:
      raise error(where, f"num_classes={self.num_classes} must be >= 1")
    check_labels(self.labels, self.images.shape[0], where, self.num_classes)

  @property
  def num_examples(self) -> int:
    return int(self.labels.shape[0])

  def fingerprint(self) -> dict[str, Any]:
    """Source, path, N and the sha256 of the arrays as loaded."""
    digest = hashlib.sha256()
    for x in (self.images, self.labels):
      digest.update(repr((x.dtype.str, x.shape)).encode())
      digest.update(np.ascontiguousarray(x).data)
    return {"name": self.name, "source": self.source, "path": self.path,
            "num_examples": self.num_examples, "sha256": digest.hexdigest()}


def describe_array(x: Any) -> str:
  return (f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray)
          else type(x).__name__)


def check_images(images: np.ndarray, shape: tuple[int, ...], where: Any,
                 spec: Spec, fix: str = "") -> None:
  """Raises DataError unless `images` is uint8 [N, *shape]."""
  if images.dtype == np.uint8 and images.shape[1:] == shape:
    return
  size = int(np.prod(images.shape[1:]))
  like = [s.title for s in SPECS.values() if s.dim == size and s != spec]
  raise error(where, f"images are a {describe_array(images)}, expected uint8 "
              f"[N, {', '.join(map(str, shape))}]"
              + (f" ({size} values per image: looks like {like[0]})"
                 if like else "") + "; wrong image shape",
              fix or f"pass {spec.title} data, or {AGAIN} if it is damaged")


def check_labels(labels: np.ndarray, num_images: int, where: Any,
                 num_classes: int = NUM_CLASSES) -> None:
  """Raises DataError unless there are `num_images` labels, all in range."""
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise error(where, f"labels are a {describe_array(labels)}, expected "
                "[N] integers", f"the file is corrupt: {AGAIN}")
  if labels.shape[0] != num_images:
    raise error(where, f"{num_images} images but {labels.shape[0]} labels",
                "the counts must match (mismatched or truncated files)")
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise error(where, f"label {int(labels[i])} at index {i} is out of range "
                f"[0, {num_classes}) ({bad.size} bad label(s) in all)",
                "the file is corrupt or not this dataset")


def check_split(split: str, source: str) -> None:
  if split not in SPLITS:
    raise error(f"split={split!r}", f"not available from source={source!r}",
                f"use one of {', '.join(SPLITS)} (split strings such as "
                "'train[:10%]' need source='tfds')")


def require_directory(path: str, what: str) -> str:
  """`path`, if it is a directory; else a DataError naming `what` it is."""
  if not os.path.exists(path):
    raise error(path, f"directory not found (the {what})", "check the path")
  if not os.path.isdir(path):
    archive = path.endswith((".tar.gz", ".tgz", ".zip"))
    raise error(path, f"not a directory (the {what})",
                "it looks like an archive: extract it and pass the directory"
                if archive else "pass the directory")
  return path


def to_dataset(spec: Spec, images: np.ndarray, labels: np.ndarray,
               where: Any, description: str, source: str,
               path: str = "") -> Dataset:
  """Checked uint8 [N, H, W, C] images and integer labels -> a Dataset."""
  check_images(images, spec.image_shape, where, spec)
  check_labels(labels, images.shape[0], where)
  flat = images.reshape(images.shape[0], spec.dim).astype(np.float32)
  return Dataset(images=flat / np.float32(255.0),
                 labels=labels.astype(np.int32), num_classes=NUM_CLASSES,
                 name=spec.name, description=description, source=source,
                 path=path or "")
