"""source="files": the original distribution files in a directory.

MNIST's `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`, or CIFAR-10's
python pickles `data_batch_1..5` / `test_batch` (in the directory or in its
`cifar-10-batches-py/`), read with an unpickler that only admits numpy
arrays. Whatever subset is present is used; a missing split falls back to the
other one, and the description says so.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from typing import Any

from absl import logging
import numpy as np

from experiments.input_pipeline import dataset as ds

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_MAGIC_MEANING = {_IDX_IMAGES_MAGIC: "an IDX images file",
                      _IDX_LABELS_MAGIC: "an IDX labels file"}
_MNIST_PREFIX = {"train": "train", "test": "t10k"}

CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test": ("test_batch",)}

# The globals a CIFAR-10 python batch may reference: numpy arrays (old and new
# numpy module paths). Anything else is refused, so a hostile file cannot run
# code.
_PICKLE_ALLOWED = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")] +
    [(f"numpy.{core}.{module}", name)
     for core in ("core", "_core")
     for module, name in (("multiarray", "_reconstruct"),
                          ("multiarray", "scalar"),
                          ("numeric", "_frombuffer"))])
# Python 3's pickle, at protocol 2, writes an empty bytes value (a
# `filenames` entry, an empty array) as a call to `__builtin__.bytes()`.
_PICKLE_BYTES = frozenset({("__builtin__", "bytes"), ("builtins", "bytes")})


def load(spec: ds.Spec, path: str, split: str) -> ds.Dataset:
  """A split of `spec`'s dataset from the distribution files in `path`."""
  ds.check_split(split, "files")
  ds.require_directory(path, f"{spec.title} files directory")
  if spec.name == "mnist":
    return _load_mnist(spec, path, split)
  return _load_cifar(spec, path, split)


def holds_files(path: str) -> bool:
  """Whether `path` holds MNIST or CIFAR-10 distribution files."""
  return _has_mnist_files(path) or _find_cifar_dir(path) is not None


def _mismatch_error(path: str, found: str, wanted: ds.Spec) -> ds.DataError:
  found = ds.SPECS[found]
  return ds.error(path, f"this looks like {found.title} files, but data.name "
                  f"is {wanted.name!r}", "set data.name/config accordingly "
                  f"(--config.data.name={found.name}) or point data.path at "
                  f"the {wanted.title} files")


def _fallback_note(requested: str, used: str, absent: str) -> str:
  if requested == used:
    return ""
  logging.warning("No %s split found (%s absent): falling back to the %s "
                  "split.", requested, absent, used)
  return f"; {absent} absent"


# ---------------------------------------------------------------------------
# MNIST: IDX files.


def _stems(split: str) -> tuple[str, str]:
  prefix = _MNIST_PREFIX[split]
  return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _present(directory: str, stem: str) -> str | None:
  """The path of `stem.gz` or `stem` in directory, whichever exists first."""
  for candidate in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(directory, candidate)):
      return os.path.join(directory, candidate)
  return None


def _has_mnist_files(directory: str) -> bool:
  return any(_present(directory, stem) is not None
             for split in _MNIST_PREFIX for stem in _stems(split))


def _load_mnist(spec: ds.Spec, directory: str, split: str) -> ds.Dataset:
  """MNIST from IDX files, using whichever complete pair of files exists."""
  pairs = {}
  for name in _MNIST_PREFIX:
    stems = _stems(name)
    found = [_present(directory, stem) for stem in stems]
    if (found[0] is None) != (found[1] is None):
      have, missing = (found[0], stems[1]) if found[0] else (found[1], stems[0])
      raise ds.error(f"{os.path.join(directory, missing)}.gz",
                     f"file not found (nor {missing}), but {have} is there",
                     "copy the missing file too")
    if found[0] is not None:
      pairs[name] = found
  if not pairs:
    if _find_cifar_dir(directory) is not None:
      raise _mismatch_error(directory, "cifar10", spec)
    raise ds.error(directory, "no MNIST files found", "expected "
                   "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                   "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or "
                   "the same names without .gz)")
  used = split if split in pairs else next(iter(pairs))
  note = _fallback_note(split, used, f"{_MNIST_PREFIX[split]} files")
  images_path, labels_path = pairs[used]
  images = _parse_idx(images_path, _IDX_IMAGES_MAGIC, 3)
  if images.shape[1:] != spec.image_shape[:2]:
    raise ds.error(images_path, f"images are {images.shape[1]}x"
                   f"{images.shape[2]}, expected {spec.image_shape[0]}x"
                   f"{spec.image_shape[1]} for {spec.title}; wrong image shape")
  labels = _parse_idx(labels_path, _IDX_LABELS_MAGIC, 1)
  if images.shape[0] != labels.shape[0]:
    raise ds.error(images_path, f"has {images.shape[0]} images but "
                   f"{labels_path} has {labels.shape[0]} labels",
                   "the counts must match (mismatched or truncated files)")
  ds.check_labels(labels, ds.NUM_CLASSES, labels_path)
  description = (f"files {directory} ({_MNIST_PREFIX[used]}-*: "
                 f"{labels.shape[0]} examples{note})")
  return ds.to_dataset(spec, images[..., None], labels, description, "files",
                       directory)


def _read_file(path: str) -> bytes:
  """The (gunzipped, for *.gz) bytes of a file."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as err:
    raise ds.error(path, f"cannot read the file ({err})") from err
  if not path.endswith(".gz"):
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as err:
    raise ds.error(path, f"corrupt or truncated gzip file ({err})",
                   "copy or download it again") from err


def _parse_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """Parses an unsigned-byte IDX file (big-endian header) into an array."""
  data = _read_file(path)
  header = 4 + 4 * ndim
  found = int.from_bytes(data[:4], "big")
  if len(data) >= 4 and found != magic:
    raise ds.error(path, f"wrong magic number: expected {magic} "
                   f"({_IDX_MAGIC_MEANING[magic]}), found {found}"
                   f"{_magic_hint(data, found)}")
  if len(data) < header:
    raise ds.error(path, f"truncated file ({len(data)} bytes, shorter than "
                   f"the {header}-byte IDX header)")
  dims = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big")
               for k in range(ndim))
  expected, payload = int(np.prod(dims)), len(data) - header
  if payload != expected:
    problem = "truncated" if payload < expected else "corrupt (trailing bytes)"
    raise ds.error(path, f"{problem} file: the header says dims {dims}, i.e. "
                   f"{expected} bytes of data, but the file holds {payload}",
                   "copy or download it again")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _magic_hint(data: bytes, found: int) -> str:
  if found in _IDX_MAGIC_MEANING:
    return f", i.e. {_IDX_MAGIC_MEANING[found]} (images and labels swapped?)"
  if data[:2] == b"\x1f\x8b":
    return ": the file is gzip-compressed; name it *.gz"
  if data[:1] == b"\x80":
    return ": this looks like a pickle (a CIFAR-10 batch?), not an IDX file"
  return ": not an MNIST IDX file"


# ---------------------------------------------------------------------------
# CIFAR-10: python pickles.


def _find_cifar_dir(path: str) -> str | None:
  """`path` or `path/cifar-10-batches-py`, whichever holds CIFAR-10 batches."""
  for candidate in (path, os.path.join(path, CIFAR_DIRNAME)):
    if any(os.path.isfile(os.path.join(candidate, n))
           for names in _CIFAR_FILES.values() for n in names):
      return candidate
  return None


def _load_cifar(spec: ds.Spec, path: str, split: str) -> ds.Dataset:
  """CIFAR-10 from python pickle batches, using whichever batches exist."""
  directory = _find_cifar_dir(path)
  if directory is None:
    if _has_mnist_files(path):
      raise _mismatch_error(path, "mnist", spec)
    binary = (os.path.isfile(os.path.join(path, "data_batch_1.bin")) or
              os.path.isdir(os.path.join(path, "cifar-10-batches-bin")))
    raise ds.error(path, f"no CIFAR-10 files found (looked in it and in "
                   f"{CIFAR_DIRNAME}/)", "the *.bin files are the binary "
                   "version, which is not supported: use the python version, "
                   "cifar-10-python.tar.gz" if binary else "expected the "
                   "python batches data_batch_1..data_batch_5 and/or "
                   "test_batch")
  available = {name: [os.path.join(directory, n) for n in names
                      if os.path.isfile(os.path.join(directory, n))]
               for name, names in _CIFAR_FILES.items()}
  available = {k: v for k, v in available.items() if v}
  used = split if split in available else next(iter(available))
  note = _fallback_note(split, used, "data_batch_*" if split == "train"
                        else "test_batch")
  batches = [_read_cifar_batch(f) for f in available[used]]
  images = np.concatenate([b[0] for b in batches])
  labels = np.concatenate([b[1] for b in batches])
  names = ", ".join(os.path.basename(f) for f in available[used])
  description = f"files {directory} ({names}: {labels.shape[0]} examples{note})"
  return ds.to_dataset(spec, images, labels, description, "files", directory)


def _empty_bytes(*args: Any) -> bytes:
  """`bytes()` as protocol-2 pickles write b""; nothing but the empty call."""
  if args:
    raise pickle.UnpicklingError(
        f"refusing bytes{args!r}: only bytes() (an empty string) is allowed")
  return b""


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays, dicts and lists only."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _PICKLE_BYTES:
      return _empty_bytes
    if (module, name) not in _PICKLE_ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to load the global {module}.{name}")
    return super().find_class(module, name)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
  """One python batch -> (uint8 [N, 32, 32, 3] HWC images, [N] labels)."""
  try:
    with open(path, "rb") as f:
      batch = _RestrictedUnpickler(f, encoding="bytes").load()
  except OSError as err:
    raise ds.error(path, f"cannot read the file ({err})") from err
  except Exception as err:  # pylint: disable=broad-except
    raise ds.error(path, f"cannot unpickle ({type(err).__name__}: {err}); the "
                   "file is truncated or corrupt, or not a CIFAR-10 python "
                   "batch", "copy or download it again") from err
  if not isinstance(batch, dict):
    raise ds.error(path, "corrupt CIFAR-10 batch: expected a dict, found "
                   f"{type(batch).__name__}")
  data, labels = (np.asarray(_batch_entry(batch, key, path))
                  for key in ("data", "labels"))
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    hint = (" (784 = 28x28 looks like MNIST)" if data.shape[-1:] == (784,)
            else "")
    raise ds.error(path, f"image data is a {ds.describe_array(data)}, "
                   f"expected uint8 [N, 3072] (32x32x3 per row){hint}; wrong "
                   "image shape or not a CIFAR-10 batch")
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ds.error(path, f"labels are a {ds.describe_array(labels)}, expected "
                   "a list of N integers; corrupt CIFAR-10 batch")
  if labels.shape[0] != data.shape[0]:
    raise ds.error(path, f"{data.shape[0]} images but {labels.shape[0]} "
                   "labels", "the counts must match (corrupt batch)")
  ds.check_labels(labels, ds.NUM_CLASSES, path)
  # Rows are channel-planar: 1024 red, 1024 green, 1024 blue values.
  return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _batch_entry(batch: dict[Any, Any], key: str, path: str) -> Any:
  for k in (key.encode(), key):
    if k in batch:
      return batch[k]
  raise ds.error(path, f"corrupt CIFAR-10 batch: no {key!r} entry (keys: "
                 f"{sorted(map(repr, batch))})")
