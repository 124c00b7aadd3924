"""The shipped measured winners: which backend the kernel benchmark found fastest, per GPU architecture and class of
call, read from `measured.yaml` next to `registry.yaml` (or the file `ATTNHUB_MEASURED` names).

Selection consults it after a forced backend and a tuning result, before priorities: a row applies when the call's
device architecture, dtype, head dim, pass (inference or training) and class of inputs equal the row's and its query
length lies in the row's [n_min, n_max) range; its backend must also be eligible for the call (otherwise priorities
decide). Classes of inputs (`inputs:`, default plain): `key_padding` (a key padding mask is given), `gqa` (grouped
k/v heads, no mask), `plain` (neither). `winners(results)` turns benchmark results into rows;
`python -m attnhub bench --winners FILE` writes the plain rows, `benchmarks/bench_varlen.py --winners FILE` the
others (`merge` keeps the rows of the classes a run did not measure).
"""

from __future__ import annotations

import functools
import importlib.resources
import math
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
import yaml

from attnhub import settings


class Row(NamedTuple):
    arch: str  # "sm_90" (CUDA compute capability 9.0), or a device type such as "cpu"
    dtype: str  # "bfloat16", ...
    head_dim: int
    training: bool
    n_min: int
    n_max: int | None  # None: no upper bound
    backend: str
    measured: str  # what was measured, for `explain`: shapes and times
    inputs: str = "plain"  # "plain", "key_padding" or "gqa" (see `inputs_of`)


INPUTS = ("plain", "key_padding", "gqa")


def inputs_of(call) -> str:
    """The class of inputs of a `select.Call`: "key_padding" with a mask, else "gqa" with grouped heads, else
    "plain"."""
    return "key_padding" if call.key_padding else "gqa" if call.gqa else "plain"


def arch_of(device_type: str, device_index: int | None) -> str:
    if device_type != "cuda":
        return device_type
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def arch_of_environment(env: dict[str, Any]) -> str:
    """The architecture a benchmark record (`benchkit.environment`) was measured on, as `arch_of` names it."""
    cc = env.get("compute_capability")
    return "sm_" + cc.replace(".", "") if cc else env["device"]


def _path() -> Path | None:
    return Path(settings.measured_path()) if settings.measured_path() else None


@functools.lru_cache(maxsize=4)
def _load(path: Path | None) -> tuple[Row, ...]:
    where = str(path) if path is not None else "attnhub/measured.yaml"
    if path is None:
        text = importlib.resources.files("attnhub").joinpath("measured.yaml").read_text()
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"ATTNHUB_MEASURED={path}: cannot read it ({exc})") from exc
    data = yaml.safe_load(text) or {}
    rows = []
    for i, r in enumerate(data.get("winners") or ()):
        try:
            rows.append(Row(str(r["arch"]), str(r["dtype"]), int(r["head_dim"]), r["pass"] == "training",
                            int(r["n_min"]), None if r.get("n_max") is None else int(r["n_max"]), str(r["backend"]),
                            str(r.get("measured", "")), str(r.get("inputs", "plain"))))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: winners[{i}] is malformed ({exc!r}): {r!r}") from exc
        if r["pass"] not in ("inference", "training"):
            raise ValueError(f"{where}: winners[{i}].pass must be inference or training, got {r['pass']!r}")
        if rows[-1].inputs not in INPUTS:
            raise ValueError(f"{where}: winners[{i}].inputs must be one of {INPUTS}, got {rows[-1].inputs!r}")
    return tuple(rows)


def clear() -> None:
    """Read the file again at the next decision."""
    _load.cache_clear()


def lookup(call, eligible: Iterable[str]) -> Row | None:
    """The row that decides `call` (a `select.Call`), if one applies and names an eligible backend."""
    rows = _load(_path())
    if not rows:
        return None
    arch = arch_of(call.device_type, call.device_index)
    dtype = str(call.dtype).removeprefix("torch.")
    training = call.needs_grad or call.rope_grad
    key = (arch, dtype, call.head_dim, training, inputs_of(call))
    for row in rows:
        if (row.arch, row.dtype, row.head_dim, row.training, row.inputs) == key and \
                row.n_min <= call.n_q and (row.n_max is None or call.n_q < row.n_max):
            return row if row.backend in eligible else None
    return None


def winners(results: list[dict[str, Any]], arch: str, device: str) -> list[dict[str, Any]]:
    """Rows for `measured.yaml` from kernel-benchmark results.

    results: dicts with shape (name), n, head_dim, dtype, pass ("fwd" or "fwd+bwd"), backend, ms and optionally
    inputs (default "plain"). Per (dtype, head_dim, pass, inputs) the measured lengths split the N axis at their
    geometric midpoints; at each length the winner is the backend with the smallest mean time relative to the
    fastest, over the shapes of that length. Rows of a class other than plain carry `inputs`.
    """
    groups: dict[tuple, dict[int, dict[str, dict[str, float]]]] = {}
    for r in results:
        key = (r["dtype"], r["head_dim"], "training" if r["pass"] == "fwd+bwd" else "inference",
               r.get("inputs", "plain"))
        groups.setdefault(key, {}).setdefault(r["n"], {}).setdefault(r["shape"], {})[r["backend"]] = r["ms"]
    out = []
    for (dtype, head_dim, pass_, inputs), by_n in sorted(groups.items()):
        ns = sorted(by_n)
        for i, n in enumerate(ns):
            shapes = by_n[n]
            common = set.intersection(*(set(t) for t in shapes.values()))
            score = {b: sum(t[b] / min(t[c] for c in common) for t in shapes.values()) / len(shapes) for b in common}
            best = min(sorted(score), key=score.get)
            times = "; ".join(f"{s}: " + ", ".join(f"{b} {t[b]:.3f}" for b in sorted(common, key=t.get))
                              for s, t in shapes.items())
            out.append(dict(
                arch=arch, dtype=dtype, head_dim=head_dim, **{"pass": pass_},
                **({} if inputs == "plain" else {"inputs": inputs}),
                n_min=0 if i == 0 else round(math.sqrt(ns[i - 1] * n)),
                n_max=None if i == len(ns) - 1 else round(math.sqrt(n * ns[i + 1])),
                backend=best, measured=f"N={n} on {device}, ms: {times}",
            ))
    return out


def _class(row: dict[str, Any]) -> tuple:
    return row["arch"], row["dtype"], row["head_dim"], row["pass"], row.get("inputs", "plain")


def merge(old_text: str | None, rows: list[dict[str, Any]], source: str) -> str:
    """The text of a `measured.yaml` holding `rows` and the rows of `old_text` (a previous file's text, or None)
    of the (arch, dtype, head dim, pass, inputs) classes `rows` does not cover."""
    new = {_class(r) for r in rows}
    old = (yaml.safe_load(old_text) or {}).get("winners") or [] if old_text else []
    return dump([r for r in old if _class(r) not in new] + rows, source)


def dump(rows: list[dict[str, Any]], source: str) -> str:
    """The text of a `measured.yaml` holding `rows`."""
    head = ("# Measured winners (attnhub/_measured.py): the fastest backend per GPU architecture, dtype, head dim,\n"
            "# pass, class of inputs and query-length range. Written by `python -m attnhub bench --winners FILE`\n"
            "# (plain inputs) and `python benchmarks/bench_varlen.py --winners FILE` (key padding, grouped heads);\n"
            f"# last: {source}. Each row's `measured` says what ran.\n")
    return head + yaml.safe_dump({"winners": rows}, sort_keys=False, width=120)
