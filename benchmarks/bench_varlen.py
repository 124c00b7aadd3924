"""Variable-resolution attention at the kernel level: attnhub against timm's own attention math, per case and pass.

    python benchmarks/bench_varlen.py --out benchmarks/results/h200_varlen.json --winners measured.yaml
    python benchmarks/bench_varlen.py --device cpu --batch 2 --rep 5 --cases naflex     # a quick smoke run
    python benchmarks/bench_varlen.py --cases naflex --impls attnhub:triton_fa_rope --set prerotate_q_from_n=384

Cases (bf16, q, k, v as [B, H, N, D] views of [B, N, H, D] projections, as a timm block hands them over; the
training pass takes them from one [B, N, H + 2 H_kv, D] leaf, as a timm block does: see `projection`; attnhub
takes a fused projection whole through `attention_packed`, as the patched timm model does):
  naflex  NaFlexViT-B: B x 12 heads x 576 tokens (the bucket), D = 64, one RoPE table per sample
          ([B, 1, N, 2D], timm's NaFlex embedding, zero rows at padding) and each sample's own grid
          (`bench_e2e.naflex_batch`: 10-40% padding). timm: `apply_rot_embed_cat` on q and k, then
          F.scaled_dot_product_attention with its additive mask from `create_attention_mask` (the model's
          default, [B, 1, N, N]). attnhub: `attention(q, k, v, rope=CosSinTable.from_sin_cos(emb),
          key_padding_mask=patch_valid)`.
  gqa     ViT-B/16@384: B x 12 query heads, 4 k/v heads, 577 tokens (1 prefix), D = 64, one axial table. timm
          (`AttentionRope(num_kv_heads=4)`): RoPE on q and k, `repeat_interleave` of k and v, SDPA. attnhub:
          `attention(q, k, v, rope=table)` with k, v unrepeated.
Implementations: `attnhub` (automatic choice), `attnhub:<backend>` forced, `timm_eager`, `timm_compiled`
(`torch.compile` of the same function). Each cell: relative L2 of o and the q, k, v gradients against `math` in
float64 over valid query rows (first two samples), then the median wall ms (`benchkit.time_ms`) and, on a GPU, the
kernels' summed time (`benchkit.gpu_ms`). Ratios: timm_compiled ms / attnhub ms. `--winners FILE` writes the
forced backends' winners into a measured.yaml as the `key_padding` (naflex) and `gqa` rows (attnhub/_measured.py),
keeping its other rows.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attnhub
from attnhub import _measured, benchkit
from attnhub.backends.triton_fa_rope import configs
from attnhub.rope import CosSinTable, axial_freqs

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import naflex_batch  # noqa: E402 - the NaFlex batch geometry of the end-to-end benchmark
from sweep import config_setting  # noqa: E402 - --set FIELD=VALUE, as sweep.py reads it

CASES = ("naflex", "gqa")
INPUTS = {"naflex": "key_padding", "gqa": "gqa"}  # the class of inputs of each case in measured.yaml
IMPLS = ("attnhub", "attnhub:triton_fa_rope", "attnhub:triton_rope_sdpa", "attnhub:torch_sdpa", "timm_eager",
         "timm_compiled")


def _timm_emb(angles: torch.Tensor) -> torch.Tensor:
    """angles [..., N, D/2] -> timm's interleaved embedding [..., N, 2D]: sin then cos, each repeated per pair."""
    return torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], -1)


def make_case(name: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs of one case: q, k, v, do (views laid out [B, N, H, D]), the timm embedding and mask, attnhub's table
    and key padding mask."""
    gen = torch.Generator().manual_seed(seed)
    D = 64
    if name == "naflex":
        H = H_kv = 12
        nb = naflex_batch(batch, 576, generator=gen)
        valid, coords = nb["patch_valid"], nb["patch_coord"].float()
        angles = coords @ axial_freqs(D).T  # [B, N, D/2]
        emb = (_timm_emb(angles) * valid[..., None])[:, None]  # [B, 1, N, 2D], zero rows at padding
        N = valid.shape[1]
        from timm.models.naflexvit import create_attention_mask

        mask = create_attention_mask(valid, num_prefix_tokens=0, symmetric=True, dtype=dtype)
        extra = {"valid": valid.to(device), "timm_mask": mask.to(device), "prefix": 0}
    elif name == "gqa":
        H, H_kv, g, P = 12, 4, 24, 1
        N = P + g * g
        ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        angles = torch.stack([ys.flatten(), xs.flatten()], -1).float() @ axial_freqs(D).T  # [N - P, D/2]
        emb = _timm_emb(angles)
        extra = {"valid": None, "timm_mask": None, "prefix": P}
    else:
        raise ValueError(f"unknown case {name!r}; expected one of {CASES}")
    q = torch.randn(batch, N, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    k, v = (torch.randn(batch, N, H_kv, D, generator=gen).to(device, dtype).transpose(1, 2) for _ in "kv")
    do = torch.randn(batch, N, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    emb = emb.to(device)
    table = CosSinTable.from_sin_cos(emb, prefix_tokens=extra["prefix"], layout="interleaved")
    return {"q": q, "k": k, "v": v, "do": do, "emb": emb, "table": table, "group": H // H_kv, **extra}


def timm_attention(q, k, v, emb, mask, prefix: int, group: int):
    """timm's math: RoPE on the non-prefix tokens of q and k (`apply_rot_embed_cat`), k and v repeated per group
    (`repeat_interleave`, as `AttentionRope` with num_kv_heads), SDPA with the additive mask."""
    from timm.layers import apply_rot_embed_cat

    def rope(x):
        return torch.cat([x[:, :, :prefix], apply_rot_embed_cat(x[:, :, prefix:], emb)], 2) if prefix else \
            apply_rot_embed_cat(x, emb)

    q, k = rope(q).type_as(v), rope(k).type_as(v)
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def implementation(impl: str, case: dict):
    """-> fn(q, k, v) -> o for one implementation name."""
    if impl.startswith("attnhub"):
        backend = impl.partition(":")[2] or None
        return lambda q, k, v: attnhub.attention(q, k, v, rope=case["table"], backend=backend,
                                                 key_padding_mask=case["valid"])
    fn = lambda q, k, v: timm_attention(q, k, v, case["emb"], case["timm_mask"], case["prefix"],  # noqa: E731
                                        case["group"])
    if impl == "timm_compiled":
        return torch.compile(fn)
    if impl == "timm_eager":
        return fn
    raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def subset(case: dict, n: int) -> dict:
    """The first n samples of a case (tables, masks and inputs sliced alike)."""
    sub = dict(case)
    for name in ("q", "k", "v", "do", "valid", "timm_mask"):
        if case[name] is not None:
            sub[name] = case[name][:n]
    if case["emb"].dim() == 4:  # one table per sample
        sub["emb"] = case["emb"][:n]
        sub["table"] = CosSinTable.from_sin_cos(sub["emb"], prefix_tokens=case["prefix"], layout="interleaved")
    return sub


def errors(impl: str, case: dict) -> dict:
    """Relative L2 of o, dq, dk, dv over valid query rows of the first two samples, against math in float64, through
    the training pass's own path (`training`; timm_compiled is checked through timm_eager: compiling for the
    subset's shapes would cost a compile)."""
    few = subset(case, 2)
    valid = few["valid"]

    def run(name, dtype, table):
        proj, views, packed = projection(*(few[n].detach().to(dtype) for n in "qkv"))
        o = training(name, dict(few, table=table))(views, packed)
        if valid is not None:  # padded query rows are not compared (timm's symmetric mask gives them zeros)
            o = torch.where(valid[:, None, :, None], o, 0)
        o.backward(few["do"].to(dtype))
        heads = [few[n].shape[1] for n in "qkv"]
        return [o, *(g.transpose(1, 2) for g in proj.grad.split(heads, 2))]

    table64 = CosSinTable.from_sin_cos(few["emb"].double(), prefix_tokens=few["prefix"], layout="interleaved")
    ref = run("attnhub:math", torch.float64, table64)
    got = run("timm_eager" if impl == "timm_compiled" else impl, few["q"].dtype, few["table"])
    return {name: ((g.double() - r).norm() / r.norm()).item()
            for name, g, r in zip(("o", "dq", "dk", "dv"), got, ref)}


def projection(q, k, v):
    """-> (a leaf [B, N, H + 2 H_kv, D] holding q, k, v; views() -> q, k, v of it as [B, H|H_kv, N, D]; packed()
    -> it as [B, N, 3, H, D] with equal head counts, else None): the training pass takes q, k, v as a model's qkv
    projection hands them over, so every implementation's gradients reach it as in the model: with equal head
    counts timm's split of a fused projection (`AttentionRope`: reshape, permute, unbind), else a split along the
    heads (separate projections)."""
    heads = [t.shape[1] for t in (q, k, v)]
    proj = torch.cat([t.transpose(1, 2) for t in (q, k, v)], 2).detach().requires_grad_()
    if len(set(heads)) == 1:
        B, N, _, D = proj.shape
        packed = lambda: proj.view(B, N, 3, heads[0], D)  # noqa: E731
        return proj, lambda: packed().permute(2, 0, 3, 1, 4).unbind(0), packed
    return proj, lambda: tuple(t.transpose(1, 2) for t in proj.split(heads, 2)), lambda: None


def training(impl: str, case: dict):
    """-> fn(views, packed) -> o, the training pass of one implementation: attnhub takes a fused projection whole
    (`attention_packed`, as the patched timm model calls it), every other implementation its views."""
    fn = implementation(impl, case)
    if not impl.startswith("attnhub"):
        return lambda views, packed: fn(*views())
    backend = impl.partition(":")[2] or None

    def attnhub_training(views, packed):
        qkv = packed()
        if qkv is None:
            return fn(*views())
        return attnhub.attention_packed(qkv, rope=case["table"], backend=backend, key_padding_mask=case["valid"])

    return attnhub_training


def measure(impl: str, case: dict, device: torch.device, warmup: int, rep: int) -> dict:
    rec: dict = {"impl": impl}
    try:
        fn, train = implementation(impl, case), training(impl, case)
        rec["rel_l2"] = errors(impl, case)
        q, k, v, do = (case[n] for n in ("q", "k", "v", "do"))
        proj, views, packed = projection(q, k, v)
        calls = {"fwd": (lambda: fn(q, k, v), None), "fwdbwd": (lambda: train(views, packed).backward(do), [proj])}
        if impl.startswith("attnhub"):
            rec["chosen"] = {p: attnhub.explain(*args, case["table"], backend=impl.partition(":")[2] or None,
                                                key_padding_mask=case["valid"]).chosen  # the pass decides too
                             for p, args in (("fwd", (q, k, v)), ("fwdbwd", views()))}
        with torch.no_grad():
            rec["ms"] = {"fwd": benchkit.time_ms(calls["fwd"][0], device=device, warmup=warmup, rep=rep)}
        rec["ms"]["fwdbwd"] = benchkit.time_ms(calls["fwdbwd"][0], device=device, warmup=warmup, rep=rep,
                                               grads=calls["fwdbwd"][1])
        if device.type == "cuda":
            with torch.no_grad():
                rec["gpu_ms"] = {"fwd": benchkit.gpu_ms(calls["fwd"][0], device=device)}
            rec["gpu_ms"]["fwdbwd"] = benchkit.gpu_ms(calls["fwdbwd"][0], device=device, grads=calls["fwdbwd"][1])
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run a case is a result too
        rec["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list (attnhub, attnhub:<backend>, timm_eager, "
                   "timm_compiled)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--winners", default=None, help="merge the measured winners into this measured.yaml")
    p.add_argument("--set", type=config_setting, action="append", default=[],
                   help="FIELD=VALUE of triton_fa_rope's config table for the whole run (`configs.override`, as "
                        "sweep.py's --set), e.g. prerotate_q_from_n=384")
    args = p.parse_args(argv)
    if args.set and args.winners:
        p.error("--winners with --set: the winners would come from a config table the package does not ship")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    fixed = dict(args.set)
    records = []
    with configs.override(**fixed):
        for name in args.cases.split(","):
            case = make_case(name, args.batch, device, dtype)
            for impl in args.impls.split(","):
                rec = {"case": name, "n": case["q"].shape[2], **measure(impl, case, device, args.warmup, args.rep)}
                records.append(rec)
                print(f"  {name} {impl}: {rec.get('error') or rec['ms']}", file=sys.stderr, flush=True)
    print(f"\n{'case':<8} {'impl':<26} {'chosen fwd / fwdbwd':<36} {'fwd ms':>8} {'fwdbwd ms':>10} {'gpu fwd':>8} {'gpu f+b':>8}"
          "  max rel_l2")
    for r in records:
        if "error" in r:
            print(f"{r['case']:<8} {r['impl']:<26} {r['error'][:90]}")
            continue
        g = r.get("gpu_ms", {})
        print(f"{r['case']:<8} {r['impl']:<26} {' / '.join(r.get('chosen', {}).values()):<36} {r['ms']['fwd']:8.3f} "
              f"{r['ms']['fwdbwd']:10.3f} {g.get('fwd', float('nan')):8.3f} {g.get('fwdbwd', float('nan')):8.3f}"
              f"  {max(r['rel_l2'].values()):.1e}")
    ratios = {}
    for name in args.cases.split(","):
        ms = {r["impl"]: r["ms"] for r in records if r["case"] == name and "ms" in r}
        if "attnhub" in ms and "timm_compiled" in ms:
            ratios[name] = {p: ms["timm_compiled"][p] / ms["attnhub"][p] for p in ("fwd", "fwdbwd")}
            print(f"{name}: timm compiled / attnhub: fwd {ratios[name]['fwd']:.2f}x, "
                  f"fwd+bwd {ratios[name]['fwdbwd']:.2f}x")
    if args.out:
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "environment": benchkit.environment(device),
                  "config": {"cases": args.cases.split(","), "batch": args.batch, "dtype": "bfloat16",
                             "warmup_ms": args.warmup, "rep_ms": args.rep,
                             "set": fixed},
                  "records": records, "ratios_timm_compiled_over_attnhub": ratios}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    if args.winners:
        write_winners(records, benchkit.environment(device), Path(args.winners), args.out or "an unsaved run")
    return 0


def write_winners(records: list[dict], env: dict, path: Path, source: str) -> None:
    """Merge the winners among the forced attnhub backends of each case and pass (records of a run in the
    environment `env`, `benchkit.environment`) into the measured.yaml at path."""
    arch = _measured.arch_of_environment(env)
    results = [dict(shape=r["case"], n=r["n"], head_dim=64, dtype="bfloat16", backend=r["impl"].partition(":")[2],
                    ms=r["ms"][p], inputs=INPUTS[r["case"]], **{"pass": "fwd" if p == "fwd" else "fwd+bwd"})
               for r in records if r["impl"].startswith("attnhub:") and "ms" in r for p in ("fwd", "fwdbwd")]
    rows = _measured.winners(results, arch, env["device_name"])
    path.write_text(_measured.merge(path.read_text() if path.exists() else None, rows, source))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
