"""The kernel benchmark's outputs: the printed tables, the plot and the measured winners (`measured.yaml`) of a
report written by `attnhub.bench.run`."""

from __future__ import annotations

from pathlib import Path

from attnhub import _measured
from attnhub.benchkit import Shape


def winners(report: dict, source: str, old_text: str | None = None) -> str:
    """measured.yaml's text: per GPU architecture the fastest attnhub backend of each timed (shape, pass), plain
    inputs; the rows of other classes in `old_text` (the file it replaces) are kept."""
    env, shapes = report["environment"], report["shapes"]
    arch = _measured.arch_of_environment(env)
    rows = [dict(shape=rec["shape"], n=shapes[rec["shape"]]["N"], head_dim=shapes[rec["shape"]]["D"],
                 dtype=report["config"]["dtype"], backend=name.partition(":")[2], ms=ms,
                 **{"pass": "fwd" if rec["pass"] == "fwd" else "fwd+bwd"})
            for rec in report["results"] for name, ms in rec["ms"].items() if name.startswith("attnhub:")]
    return _measured.merge(old_text, _measured.winners(rows, arch, env["device_name"]), source)


# ------------------------------------------------------------------------------------------------ reporting
def print_tables(report: dict) -> None:
    """The sections present: timings (ms), ratios and % of the HBM floor, first calls and errors; cold and warm
    first calls; host µs and the dispatch overhead."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    if "results" in report:
        _print_table(console, report)
    if "first_call" in report:
        _print_first_call(console, report["first_call"])
    if "host" in report:
        _print_host(console, report["host"])


def _print_table(console, report: dict) -> None:
    from rich.table import Table

    cfg, env = report["config"], report["environment"]
    impls, primary = cfg["impls"], cfg["primary"]
    title = (f"{env['device_name']}, {cfg['dtype']}, {cfg['timer']} (ms); copy bandwidth "
             f"{report['copy_bandwidth_gbs']:.0f} GB/s; primary {primary}")
    t = Table(title=title, caption=f"ratio: {primary} ms / other ms (< 1: {primary} is faster); % of floor: "
              f"HBM floor / {primary} ms")
    vs = cfg["ratios_vs"]
    for col in ["shape", "pass", *impls, "HBM floor", *[f"ratio vs {o}" for o in vs], "% of floor"]:
        t.add_column(col, justify="left" if col in ("shape", "pass") else "right")
    for rec in report["results"]:
        cells = [_ms_cell(rec, n) for n in impls]
        ratios = [f"{rec['ratios'][o]:.2f}x" if o in rec["ratios"] else "-" for o in vs]
        pct = rec["pct_of_floor"].get(primary)
        shape = str(Shape(**report["shapes"][rec["shape"]])) if rec["pass"] == cfg["passes"][0] else ""
        t.add_row(shape, rec["pass"], *cells, f"{rec['floor_ms']:.3f}", *ratios, "-" if pct is None else f"{pct:.0f}%")
    console.print(t)

    c = Table(title=f"first call in this process (s) and relative L2 error vs {cfg['reference']} (o / max grad)")
    c.add_column("shape")
    for n in impls:
        c.add_column(n, justify="right")
    for shape, checks in report["checks"].items():
        c.add_row(shape, *[_check_cell(checks.get(n)) for n in impls])
    console.print(c)
    errors = {(r["shape"], n): e for r in report["results"] for n, e in r["errors"].items()}
    for (shape, name), err in errors.items():
        console.print(f"[red]{shape} {name}[/]: {err}")


def _print_first_call(console, first: dict) -> None:
    from rich.table import Table

    t = Table(title="first call of each shape in a fresh process (s, fwd + bwd; bg: the wait after them for kernels "
              "compiling in the background): cold (empty Triton cache), warm (Triton's disk cache)")
    for col in ("backend", "shape", "cold fwd", "cold bwd", "cold bg", "warm fwd", "warm bwd", "warm bg"):
        t.add_column(col, justify="left" if col in ("backend", "shape") else "right")
    for backend, rec in first.items():
        failed = {label: r["error"] for label, r in rec.items() if "error" in r}
        for label, err in failed.items():
            console.print(f"[red]first call {backend} {label}[/]: {err}")
        rows = {label: {r["shape"]: r for r in rs} for label, rs in rec.items() if label not in failed}
        for shape in dict.fromkeys(s for rs in rows.values() for s in rs):
            cells = [f"{rows[label][shape][part]:.2f}" if part in rows.get(label, {}).get(shape, {}) else "-"
                     for label in ("cold", "warm") for part in ("fwd_s", "bwd_s", "background_s")]
            t.add_row(backend, shape, *cells)
    console.print(t)


def _print_host(console, h: dict) -> None:
    from rich.table import Table

    t = Table(title=f"host µs per cached call at {h['shape']} ({h['calls']} calls, best of 10 loops)")
    for col in ("implementation", "fwd", "fwd+bwd"):
        t.add_column(col, justify="left" if col == "implementation" else "right")
    for impl, us in h["us"].items():
        t.add_row(impl, *[f"{us[p]:.1f}" if p in us else "-" for p in ("fwd", "fwdbwd")])
    console.print(t)
    for what, err in h["errors"].items():
        console.print(f"[red]host {what}[/]: {err}")
    for name, o in h["dispatch_overhead"].items():
        if "error" in o:
            console.print(f"dispatch overhead {name}: [red]{o['error']}[/]")
        else:
            console.print(f"dispatch overhead {name} ({o['backend']}): {o['overhead_us']:.1f} µs per call "
                          f"({o['attention_us']:.1f} via attnhub.attention, {o['entry_us']:.1f} entry direct)")


def _ms_cell(rec: dict, name: str) -> str:
    if name in rec["ms"]:
        return f"{rec['ms'][name]:.3f}"
    err = rec["errors"].get(name, "")
    return "[red]wrong[/]" if err.startswith("wrong") else "[red]error[/]" if err else "-"


def _check_cell(chk: dict | None) -> str:
    if chk is None:
        return "-"
    if "first_call_s" not in chk:
        return "[red]error[/]"
    cell = f"{chk['first_call_s']:.2f} s"
    if "rel_l2" in chk:
        errs = chk["rel_l2"]
        grads = [e for e in (errs["dq"], errs["dk"], errs["dv"]) if e is not None]
        mark = "" if chk["ok"] else "[red]✗[/] "
        cell += f"  {mark}{errs['o']:.1e}" + (f" / {max(grads):.1e}" if grads else "")
    return cell


def plot(report: dict, path: str | Path) -> None:
    """Bar chart (log scale) of ms per shape and implementation, one panel per pass, the HBM floor in black."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless

    cfg, passes = report["config"], report["config"]["passes"]
    labels = [*cfg["impls"], "HBM floor"]
    shapes = list(report["shapes"])
    fig = Figure(figsize=(max(7.0, 1.6 * len(shapes) + 3), 3.8 * len(passes)), layout="constrained")
    axes = fig.subplots(len(passes), 1, squeeze=False)[:, 0]
    width = 0.85 / len(labels)
    for ax, pass_ in zip(axes, passes):
        recs = {r["shape"]: r for r in report["results"] if r["pass"] == pass_}
        for i, label in enumerate(labels):
            pts = [(j, recs[s]["floor_ms"] if label == "HBM floor" else recs[s]["ms"].get(label))
                   for j, s in enumerate(shapes) if s in recs]
            pts = [(j + (i - (len(labels) - 1) / 2) * width, y) for j, y in pts if y is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.bar(xs, ys, width, label=label, color="black" if label == "HBM floor" else None)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize="small")
        ax.set_yscale("log")
        ax.set_ylabel("ms (log scale)")
        ax.set_title(f"{pass_}: {report['environment']['device_name']}, {cfg['dtype']}")
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
