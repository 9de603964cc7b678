"""source="files": MNIST IDX files or CIFAR-10 python batches in a directory.

A missing split falls back to the other one, and the description says so.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zlib
from typing import Any

from absl import logging
import numpy as np

from experiments.input_pipeline import dataset as ds

# IDX magic numbers: unsigned bytes in 3 (images) or 1 (labels) dimensions.
_IDX_MAGIC = {2051: "an IDX images file", 2049: "an IDX labels file"}
_MNIST_PREFIX = {"train": "train", "test": "t10k"}
CIFAR_DIRNAME = "cifar-10-batches-py"
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test": ("test_batch",)}
# The globals a CIFAR-10 python batch may reference: numpy arrays (old and new
# numpy module paths). Anything else is refused, so a hostile file cannot run
# code. Python 3's pickle, at protocol 2, writes an empty bytes value (a
# `filenames` entry, an empty array) as a call to `__builtin__.bytes()`.
_PICKLE_ALLOWED = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")] +
    [(f"numpy.{core}.{module}", name) for core in ("core", "_core")
     for module, name in (("multiarray", "_reconstruct"), ("multiarray",
                          "scalar"), ("numeric", "_frombuffer"))])
_PICKLE_BYTES = frozenset({("__builtin__", "bytes"), ("builtins", "bytes")})


def load(spec: ds.Spec, path: str | None, split: str) -> ds.Dataset:
  """A split of `spec`'s dataset from the distribution files in `path`."""
  if path is None:
    raise ds.error("source='files'", f"needs the directory holding the "
                   f"{spec.title} files", "set path "
                   "(--config.data.path=/path/to/dir)")
  ds.check_split(split, "files")
  ds.require_directory(path, f"{spec.title} files directory")
  mnist = spec.name == "mnist"
  directory, found = (path, _mnist_pairs(path)) if mnist else _cifar(path)
  if not found:
    raise _not_found(spec, path)
  used = split if split in found else next(iter(found))
  note = ""
  if used != split:
    absent = (f"{_MNIST_PREFIX[split]} files" if mnist else
              "data_batch_*" if split == "train" else "test_batch")
    logging.warning("No %s split found (%s absent): falling back to the %s "
                    "split.", split, absent, used)
    note = f"; {absent} absent"
  paths = found[used]
  if mnist:
    images = _parse_idx(paths[0], 2051, 3)[..., None]
    labels = _parse_idx(paths[1], 2049, 1)
    names, where = f"{_MNIST_PREFIX[used]}-*", " and ".join(paths)
  else:
    images, labels = _read_cifar(paths)
    names, where = ", ".join(map(os.path.basename, paths)), paths[-1]
  return ds.to_dataset(spec, images, labels, where, f"files {directory} "
                       f"({names}: {labels.shape[0]} examples{note})",
                       "files", directory)


def holds_files(path: str) -> bool:
  """Whether `path` holds MNIST or CIFAR-10 distribution files."""
  return bool(_mnist_pairs(path, strict=False) or _cifar(path)[1])


def _not_found(spec: ds.Spec, path: str) -> ds.DataError:
  other = ds.SPECS["cifar10" if spec.name == "mnist" else "mnist"]
  if holds_files(path):
    return ds.error(path, f"this looks like {other.title} files, but "
                    f"data.name is {spec.name!r}", "set data.name/config "
                    f"accordingly (--config.data.name={other.name}) or point "
                    f"data.path at the {spec.title} files")
  if spec.name == "mnist":
    return ds.error(path, "no MNIST files found", "expected "
                    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
                    "(or the same names without .gz)")
  binary = (os.path.isfile(os.path.join(path, "data_batch_1.bin")) or
            os.path.isdir(os.path.join(path, "cifar-10-batches-bin")))
  return ds.error(path, f"no CIFAR-10 files found (looked in it and in "
                  f"{CIFAR_DIRNAME}/)", "the *.bin files are the binary "
                  "version, which is not supported: use the python version, "
                  "cifar-10-python.tar.gz" if binary else "expected the "
                  "python batches data_batch_1..data_batch_5 and/or "
                  "test_batch")


def _mnist_pairs(directory: str, strict: bool = True) -> dict[str, list]:
  """{split: [images path, labels path]}; a half pair raises if `strict`."""
  pairs = {}
  for split, prefix in _MNIST_PREFIX.items():
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    found = [next((os.path.join(directory, stem + ext) for ext in (".gz", "")
                   if os.path.isfile(os.path.join(directory, stem + ext))),
                  None) for stem in stems]
    if strict and (found[0] is None) != (found[1] is None):
      have, missing = (found[0], stems[1]) if found[0] else (found[1], stems[0])
      raise ds.error(f"{os.path.join(directory, missing)}.gz",
                     f"file not found (nor {missing}), but {have} is there",
                     "copy the missing file too")
    if found[0] or found[1]:
      pairs[split] = found
  return pairs


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
                   ds.AGAIN) from err


def _parse_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """Parses an unsigned-byte IDX file (big-endian header) into an array."""
  data = _read_file(path)
  header = 4 + 4 * ndim
  found = int.from_bytes(data[:4], "big")
  if len(data) >= 4 and found != magic:
    hint = (f", i.e. {_IDX_MAGIC[found]} (images and labels swapped?)"
            if found in _IDX_MAGIC else
            ": the file is gzip-compressed; name it *.gz"
            if data[:2] == b"\x1f\x8b" else
            ": this looks like a pickle (a CIFAR-10 batch?), not an IDX file"
            if data[:1] == b"\x80" else ": not an MNIST IDX file")
    raise ds.error(path, f"wrong magic number: expected {magic} "
                   f"({_IDX_MAGIC[magic]}), found {found}{hint}")
  if len(data) < header:
    raise ds.error(path, f"truncated file ({len(data)} bytes, shorter than "
                   f"the {header}-byte IDX header)", ds.AGAIN)
  dims = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big")
               for k in range(ndim))
  expected, payload = int(np.prod(dims)), len(data) - header
  if payload != expected:
    problem = "truncated" if payload < expected else "corrupt (trailing bytes)"
    raise ds.error(path, f"{problem} file: the header says dims {dims}, i.e. "
                   f"{expected} bytes of data, but the file holds {payload}",
                   ds.AGAIN)
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _cifar(path: str) -> tuple[str, dict[str, list[str]]]:
  """(directory, {split: batch paths}): `path` or its cifar-10-batches-py."""
  for directory in (path, os.path.join(path, CIFAR_DIRNAME)):
    found = {split: [os.path.join(directory, n) for n in names
                     if os.path.isfile(os.path.join(directory, n))]
             for split, names in _CIFAR_FILES.items()}
    if any(found.values()):
      return directory, {k: v for k, v in found.items() if v}
  return path, {}


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


def _read_cifar(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Python batches -> (uint8 [N, 32, 32, 3] HWC images, [N] labels)."""
  images, labels = [], []
  for path in paths:
    raw = _read_file(path)
    try:
      batch = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # pylint: disable=broad-except
      raise ds.error(path, f"cannot unpickle ({type(err).__name__}: {err}); "
                     "the file is truncated or corrupt, or not a CIFAR-10 "
                     "python batch", ds.AGAIN) from err
    if not isinstance(batch, dict):
      raise ds.error(path, "corrupt CIFAR-10 batch: expected a dict, found "
                     f"{type(batch).__name__}", ds.AGAIN)
    for key in ("data", "labels"):
      if key not in batch and key.encode() not in batch:
        raise ds.error(path, f"corrupt CIFAR-10 batch: no {key!r} entry "
                       f"(keys: {sorted(map(repr, batch))})", ds.AGAIN)
    data, y = (np.asarray(batch.get(k.encode(), batch.get(k)))
               for k in ("data", "labels"))
    ds.check_images(data, (3072,), path, ds.SPECS["cifar10"])
    ds.check_labels(y, data.shape[0], path)
    # Rows are channel-planar: 1024 red, 1024 green, 1024 blue values.
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(y)
  return np.concatenate(images), np.concatenate(labels)
