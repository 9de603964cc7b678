"""The reporting layer: numbers, JSON, paired ratios, markdown tables, goals.

Every measuring program builds its report as plain data, judges its `Goal`
rows (`judge_all`) and writes <out>/<stem>.{json,md} with `write`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import operator
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import workdir


def jsonable(x: Any) -> Any:
  """`x` with numpy scalars as Python numbers, non-finite floats as None,
  mappings as dicts with string keys, sequences as lists, and anything else
  but a string or None as its `str`."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(float(x)) else None
  return x if x is None or isinstance(x, str) else str(x)


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None where either is missing or b is zero."""
  return None if a is None or b is None or not b else a / b


def rel_err(value: float, ref: float) -> float:
  """|value - ref| / |ref| (the absolute error where ref is zero)."""
  return abs(value - ref) / abs(ref) if ref else abs(value - ref)


def fmt(x: Any, spec: str = ".3g", missing: str = "n/a") -> str:
  """One cell: a number by `spec`, a bool as yes/no, None as `missing`."""
  if x is None:
    return missing
  if isinstance(x, (bool, np.bool_)):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    return format(float(x), spec) if math.isfinite(x) else str(float(x))
  return str(x)


def mib(nbytes: int | None) -> str:
  """Bytes as MiB with two decimals ("n/a" for None)."""
  return "n/a" if nbytes is None else f"{nbytes / 2**20:.2f}"


def with_iqr(value: Any, iqr: Sequence[Any] | None, cell=fmt) -> str:
  """"median [25th, 75th percentile]", or the median alone without an IQR."""
  if not iqr:
    return cell(value)
  return f"{cell(value)} [{cell(iqr[0])}, {cell(iqr[1])}]"


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
  """(q1, median, q3) of `values`."""
  q1, med, q3 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
  return float(q1), float(med), float(q3)


def paired(seconds: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
  """ms_per_step, ms_q1, ms_q3; ratio, ratio_q1, ratio_q3 of the per-repeat
  seconds[i] / base[i]; ratio_of_medians; samples_ms."""
  s, b = np.asarray(seconds, np.float64), np.asarray(base, np.float64)
  q1, med, q3 = quartiles(s * 1e3)
  r1, rmed, r3 = quartiles(s / b)
  return dict(ms_per_step=med, ms_q1=q1, ms_q3=q3, ratio=rmed, ratio_q1=r1,
              ratio_q3=r3, ratio_of_medians=med / (np.median(b) * 1e3),
              samples_ms=[float(t * 1e3) for t in s])


def _cell(x: Any) -> str:
  text = x if isinstance(x, str) else fmt(x)
  return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
  """A markdown table's lines; a cell that is not a string goes by `fmt`."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return lines


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt,
        ">=": operator.ge}


@dataclasses.dataclass(frozen=True)
class Goal:
  """A target in words: the measured value must be `op` ("<", "<=", ">",
  ">=") the `bar` (None: the goal alone is judged), ideally `goal_op` (default
  `op`) the stretch `goal` (or None); `source` says where it comes from."""
  target: str
  op: str
  bar: float | None
  goal: float | None = None
  source: str = ""
  goal_op: str | None = None

  def __post_init__(self):
    for op in (self.op, self.goal_op or self.op):
      if op not in _OPS:
        raise ValueError(f"Goal {self.target!r}: op {op!r}; expected one "
                         f"of {', '.join(_OPS)}.")
    if self.bar is None and self.goal is None:
      raise ValueError(f"Goal {self.target!r}: give a bar, a goal or both.")


def judge(goal: Goal, value: float | None, measured: str = "") -> dict:
  """A goal row: the target, the measured value (None: not measured), words.

  Returns:
    The goal's fields, value, measured, met (the bar, else the goal),
    goal_met and verdict: "not measured", "met", "met (goal)", "met (bar;
    goal OP X not yet)" or "NOT met (gap ...)".
  """
  goal_op = goal.goal_op or goal.op
  row = dict(target=goal.target, op=goal.op, bar=goal.bar, goal=goal.goal,
             goal_op=goal_op, source=goal.source, value=value,
             measured=measured or fmt(value), met=None, goal_met=None,
             verdict="not measured")
  if value is None or not math.isfinite(value):
    return row
  if goal.goal is not None:
    row["goal_met"] = _OPS[goal_op](value, goal.goal)
  if goal.bar is None:
    op, first, row["met"] = goal_op, goal.goal, row["goal_met"]
  else:
    op, first, row["met"] = goal.op, goal.bar, _OPS[goal.op](value, goal.bar)
  if not row["met"]:
    row["verdict"] = f"NOT met (gap: {value:.3g} vs {op} {first:g})"
  elif goal.goal is None or goal.bar is None:
    row["verdict"] = "met"
  elif row["goal_met"]:
    row["verdict"] = "met (goal)"
  else:
    row["verdict"] = f"met (bar; goal {goal_op} {goal.goal:g} not yet)"
  return row


def judge_all(goals: Iterable[tuple[Goal, Callable[[Any], Any]]],
              report: Any, note: str = "") -> list[dict]:
  """`judge` of each (goal, reader) pair; a reader gives (value, words) or
  None (not measured). A `note` is appended to every verdict in brackets."""
  rows = [judge(goal, *(read(report) or (None, ""))) for goal, read in goals]
  for row in rows if note else ():
    row["verdict"] += f" [{note}]"
  return rows


def goals_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The goal rows as a markdown table."""
  def target(r):
    levels = [f"bar {r['op']} {r['bar']:g}" if r["bar"] is not None else "",
              f"goal {r['goal_op']} {r['goal']:g}" if r["goal"] is not None
              else ""]
    where = f" [{r['source']}]" if r["source"] else ""
    return f"{r['target']} ({', '.join(l for l in levels if l)}){where}"
  return table(["target", "measured", "verdict"],
               [(target(r), r["measured"], r["verdict"]) for r in rows])


def now() -> str:
  """The local date and time, to the second, with its offset."""
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line(module: str) -> str:
  """`python -m <module>` and this process's arguments, shell-quoted."""
  return " ".join([f"python -m {module}"]
                  + [shlex.quote(a) for a in sys.argv[1:]])


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  """The machine: device, backend, jax and jaxlib versions, CPUs, python."""
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return dict(device_kind=dev.device_kind, device=str(dev),
              backend=jax.default_backend(), device_count=jax.device_count(),
              jax_version=jax.__version__,
              jaxlib_version=getattr(jaxlib, "__version__", None),
              cpu_count=os.cpu_count(), cpu=_cpu_model(),
              platform=platform.platform(), python=platform.python_version())


def environment_line(env: Mapping[str, Any]) -> str:
  """The environment in one line of words."""
  return (f"**{env['device_kind']}** ({env['backend']}, "
          f"{env['device_count']} device(s)); jax {env['jax_version']}, "
          f"jaxlib {env['jaxlib_version']}; python {env['python']}; "
          f"{env['cpu_count']} CPU cores ({env['cpu']}); {env['platform']}")


def stamp(command: str) -> dict[str, Any]:
  """A report's provenance: its command, the date and the machine."""
  return dict(command=command, date=now(), environment=environment())


def header(title: str, report: Mapping[str, Any]) -> list[str]:
  """A report's first markdown lines: title, command, date, machine."""
  return [f"# {title}", "", f"- command: `{report['command']}`",
          f"- date: {report['date']}",
          f"- machine: {environment_line(report['environment'])}"]


def write(out: str, stem: str, report: Mapping[str, Any],
          markdown: str) -> dict[str, Any]:
  """Writes <out>/<stem>.{json,md}, each replaced atomically; returns the
  report as written (`jsonable`)."""
  report = jsonable(report)
  os.makedirs(out, exist_ok=True)
  for ext, text in (("json", json.dumps(report, indent=1, allow_nan=False)),
                    ("md", markdown.rstrip())):
    workdir.atomic_write(os.path.join(out, f"{stem}.{ext}"),
                         (text + "\n").encode("utf-8"))
  return report
