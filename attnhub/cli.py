"""`python -m attnhub {check,info,bench}`."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

# (name, B, H, grid, prefix tokens, D): the ViT shapes `check` explains.
_VIT_SHAPES = [
    ("ViT-S/16@224", 256, 6, 14, 1, 64),
    ("ViT-B/16@384", 64, 12, 24, 1, 64),
    ("ViT-B/16@512+4reg", 32, 12, 32, 5, 64),
]


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return f"cpu ({platform.processor() or platform.machine()}); no CUDA device"


def _versions() -> str:
    import importlib.metadata as md

    out = []
    for pkg in ("attnhub", "torch", "triton", "timm"):
        try:
            out.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def info(_args) -> int:
    import attnhub

    device = _device()
    print(f"device: {_describe_device(device)}")
    print(f"versions: {_versions()}, python {platform.python_version()}")
    for b in attnhub.list_backends():
        state = "available" if b.available else f"unavailable: {b.why_not}"
        print(f"  {b.name:<16} priority {b.priority:>4}  {state}\n  {'':<16} {b.description}")
    return 0


def check(args) -> int:
    """Device, backends, the choice for a few ViT shapes, and a small parity check of every runnable backend.

    Returns 1 when any backend that ran disagrees with `math` in float64 (or raised), 0 otherwise.
    """
    import torch

    device = _device()
    if device.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # The Triton backend runs on the CPU only through its interpreter, and triton reads TRITON_INTERPRET when
        # it is imported, which `import attnhub` (through torch) has already done: check in a fresh process.
        sys.stdout.flush()
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "attnhub", "check"], env=env, check=False).returncode
    import attnhub
    from attnhub import settings
    from attnhub.registry import REGISTRY

    info(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"\nchoice for {dtype} inputs with an interleaved RoPE table:")
    for name, B, H, g, P, D in _VIT_SHAPES:
        # explain reads shapes, dtype and device only: a broadcast view allocates nothing
        q = torch.zeros((), device=device, dtype=dtype).expand(B, H, P + g * g, D)
        table = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device=device)
        print(f"{name} {tuple(q.shape)}: " + str(attnhub.explain(q, q, q, table)).replace("\n", "\n    "))

    print("\nparity against math in float64 (relative L2 error, forward and dq/dk/dv):")
    B, H, g, P, D = (2, 3, 5, 1, 64) if device.type == "cuda" else (1, 2, 3, 1, 32)
    shape = (B, H, P + g * g, D)
    dtypes = [torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32]
    table = attnhub.CosSinTable(grid=(g, g), head_dim=D, prefix_tokens=P, device=device)
    rows = []
    with settings.override(background_compile=False):  # check the kernels that serve the shape, from the first call
        for name, spec in REGISTRY.specs().items():
            rows += [_check_one(name, spec, dt, shape, device, table) for dt in dtypes]
    print(f"  {'backend':<16} {'dtype':<9} {'result':<6} detail")
    for name, dt, result, detail in rows:
        print(f"  {name:<16} {str(dt).replace('torch.', ''):<9} {result:<6} {detail}")
    count = {r: sum(row[2] == r for row in rows) for r in ("PASS", "FAIL", "skip")}
    print(f"\n{count['PASS']} passed, {count['FAIL']} failed, {count['skip']} skipped")
    return 1 if count["FAIL"] else 0


def _check_one(name, spec, dt, shape, device, table) -> tuple:
    """(name, dtype, "PASS", "FAIL" or "skip", detail) of one backend and dtype against math in float64."""
    import torch

    import attnhub

    q, k, v = (torch.randn(shape, device=device, dtype=dt) for _ in range(3))
    do = torch.randn(shape, device=device, dtype=dt)
    ref = _run("math", q.double(), k.double(), v.double(), do.double(), table, spec.backward)
    try:
        got = _run(name, q, k, v, do, table, spec.backward)
    except attnhub.BackendUnavailableError as exc:  # cannot run here: not a failure
        return name, dt, "skip", str(exc).splitlines()[0][:120]
    except Exception as exc:  # a backend that raises on a call it accepts is broken
        return name, dt, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    return (name, dt, *_compare(got, ref, dt))


def _run(backend, q, k, v, do, table, backward=True):
    """(o, dq, dk, dv) of `backend` (only (o,) when it has no backward)."""
    import attnhub

    q, k, v = (t.detach().requires_grad_(backward) for t in (q, k, v))
    o = attnhub.attention(q, k, v, table.to(q.device), backend=backend)
    if o.shape != q.shape:
        raise ValueError(f"o: expected shape {tuple(q.shape)}, got {tuple(o.shape)}")
    if not backward:
        return (o.detach(),)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def _compare(got, ref, dtype) -> tuple[str, str]:
    """("PASS" or "FAIL", detail): relative L2 error of each of o, dq, dk, dv against the float64 reference, within
    the bounds of `attnhub.tolerances` (the ones the tests hold every backend to)."""
    from attnhub.tolerances import bound, rel_l2

    errs, ok = [], True
    for what, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
        if g is None or g.shape != r.shape:
            return "FAIL", f"{what}: expected shape {tuple(r.shape)}, got {None if g is None else tuple(g.shape)}"
        err = rel_l2(g, r)
        ok = ok and err <= bound(dtype, grad=what != "o")  # False for NaN
        errs.append((what, err))
    return ("PASS" if ok else "FAIL"), " ".join(f"{w}={e:.1e}" for w, e in errs)


def bench(args) -> int:
    from attnhub import bench as _bench

    return _bench.main(args.bench_args) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnhub", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="device, backends, choices for ViT shapes, parity check").set_defaults(fn=check)
    sub.add_parser("info", help="device, versions and backends").set_defaults(fn=info)
    sub.add_parser("bench", help="kernel benchmark; `python -m attnhub bench --help` lists its options",
                   add_help=False).set_defaults(fn=bench)
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.bench_args = rest
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
