"""The library/application split: a lean `lrcr`, an `experiments` extra."""

import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APPLICATION_DEPS = ("absl", "ml_collections", "orbax", "tensorflow_datasets",
                    "tensorflow", "matplotlib", "mlxtend", "tqdm",
                    "experiments", "configs")


def test_import_lrcr_loads_no_application_dependency():
  # absl is imported by optax and flax themselves, so it is not checked.
  code = ("import sys, lrcr; print(sorted({m.split('.')[0] for m in "
          "sys.modules}))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.join(
      ROOT, "lrcr"), capture_output=True, text=True, check=True, timeout=120)
  loaded = set(eval(proc.stdout))  # pylint: disable=eval-used
  assert not loaded & (set(APPLICATION_DEPS) - {"absl"}), loaded


def test_lrcr_never_imports_the_application():
  for name in os.listdir(os.path.join(ROOT, "lrcr")):
    if name.endswith(".py"):
      with open(os.path.join(ROOT, "lrcr", name), encoding="utf-8") as f:
        text = f.read()
      found = re.findall(r"^\s*(?:from|import)\s+(\w+)", text, re.M)
      assert not set(found) & set(APPLICATION_DEPS), (name, found)


def test_hard_dependencies_are_what_optax_and_flax_need():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  names = {re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]}
  assert names == {"jax", "jaxlib", "optax", "flax", "numpy"}
  assert "lrcr[experiments]" in project["optional-dependencies"]["test"]


def test_the_package_is_only_the_library():
  """What setuptools packs with pyproject's `packages.find` settings."""
  setuptools = pytest.importorskip("setuptools")
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
  packages = setuptools.find_packages(ROOT, include=find["include"])
  assert packages == ["lrcr"]
  assert "experiments" in setuptools.find_packages(ROOT)   # left out on purpose
