"""Cross-check bmmstream's task_arithmetic and per-tensor ties against mergekit on the same inputs.

mergekit is never a dependency of bmmstream: it lives in its own virtual environment
(bench/out/mergekit-venv, created on first use with `pip install torch==<this torch> mergekit`) and is
run through its `mergekit-yaml` CLI. Both tools merge the same tiny synthetic Llama suite with
matching parameters; every output tensor is compared and must agree within bf16 rounding
(|a - b| <= 2^-8 * max(|a|, |b|) + tiny, i.e. half a bf16 ulp of relative precision is exceeded by
neither more than float32 arithmetic-order noise).

    nice python bench/crosscheck_mergekit.py            # builds venv (once), suite, runs both, prints
    nice python bench/crosscheck_mergekit.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "out" / "crosscheck"
VENV = ROOT / "bench" / "out" / "mergekit-venv"
BF16_REL = 2.0**-8  # bf16 keeps 8 significant bits: relative spacing 2^-7, rounding error <= 2^-8


def ensure_mergekit(install: bool) -> Path:
    exe = VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    if not install:
        raise SystemExit(f"{exe} missing; run without --no-install to create the venv")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    torch_pin = "torch==" + torch.__version__  # e.g. 2.13.0+cpu: no CUDA download on CPU boxes
    subprocess.run([str(VENV / "bin" / "pip"), "install", torch_pin, "mergekit"], check=True)
    return exe


def mergekit_version() -> str:
    out = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return tensors


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[dict]:
    if set(a) != set(b):
        raise SystemExit(f"tensor names differ: only bmmstream {sorted(set(a) - set(b))}, "
                         f"only mergekit {sorted(set(b) - set(a))}")
    rows = []
    for name in sorted(a):
        x, y = a[name].double(), b[name].double()
        diff = (x - y).abs()
        scale = torch.maximum(x.abs(), y.abs())
        tol = BF16_REL * scale + 1e-30
        rows.append({
            "tensor": name,
            "max_abs": float(diff.max()),
            "max_rel": float((diff / scale.clamp(min=1e-30)).max()),
            "max_ratio_to_bf16_tol": float((diff / tol).max()),
            "ok": bool((diff <= tol).all()),
        })
    return rows


def run_case(name: str, exe: Path, suite, mk_cfg: dict, bmm_cfg: dict) -> dict:
    import bmmstream

    case = OUT / name
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    (case / "mergekit.yml").write_text(yaml.safe_dump(mk_cfg, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    proc = subprocess.run([str(exe), str(case / "mergekit.yml"), str(case / "mergekit_out")],
                          capture_output=True, text=True, env=env)
    t_mk = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed for {name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    t0 = time.time()
    bmmstream.merge(bmm_cfg, out=case / "bmm_out", run_dir=case / "bmm_run", progress=False)
    t_bmm = time.time() - t0
    ours, theirs = load_folder(case / "bmm_out"), load_folder(case / "mergekit_out")
    rows = compare(ours, theirs)
    base = load_folder(Path(suite.base))
    # the merge must actually move the weights, or agreeing would prove nothing
    moved = max(float((ours[k].double() - base[k].double()).abs().max()) for k in ours)
    return {"case": name, "mergekit_s": round(t_mk, 2), "bmmstream_s": round(t_bmm, 2), "tensors": rows,
            "max_abs_change_from_base": moved, "ok": all(r["ok"] for r in rows) and moved > 0}


def negative_control(suite, base_dir_case: str, bmm_cfg: dict) -> dict:
    """bmmstream's global-threshold ties against mergekit's per-tensor ties: these must differ."""
    import bmmstream

    case = OUT / "control_ties_global"
    shutil.rmtree(case, ignore_errors=True)
    bmmstream.merge(bmm_cfg, out=case / "bmm_out", run_dir=case / "bmm_run", progress=False)
    rows = compare(load_folder(case / "bmm_out"), load_folder(OUT / base_dir_case / "mergekit_out"))
    return {"case": "control: bmmstream ties(global) vs mergekit ties (must FAIL)",
            "tensors_failing": sum(not r["ok"] for r in rows), "tensors": len(rows),
            "worst_ratio_to_bf16_tol": max(r["max_ratio_to_bf16_tol"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--scale", type=float, default=0.3, help="task_arithmetic weight/scale")
    ap.add_argument("--density", type=float, default=0.2, help="ties density")
    ap.add_argument("--suite-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the synthetic checkpoints (merges compute and write float32)")
    ap.add_argument("--no-install", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from bmmstream.demo import make_llama_suite

    exe = ensure_mergekit(not args.no_install)
    suite = make_llama_suite(OUT / f"suite_{args.suite_dtype}", num_experts=args.experts, hidden=args.hidden,
                             intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                             dtype=args.suite_dtype)
    base, experts = str(suite.base), [str(e) for e in suite.experts]

    def mk(method: str, per_model: dict, shared: dict) -> dict:
        return {"merge_method": method, "base_model": base,
                "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
                "parameters": shared, "dtype": "float32", "out_dtype": "float32"}

    def bm(method: str, params: dict) -> dict:
        return {"base_model": base, "models": [{"model": e} for e in experts], "merge_method": method,
                "parameters": params, "dtype": "float32", "out_dtype": "float32", "shard_size": 2**31}

    cases = [
        ("task_arithmetic",
         mk("task_arithmetic", {"weight": args.scale}, {"normalize": False, "lambda": 1.0}),
         bm("task_arithmetic", {"scale": args.scale})),
        ("ties_per_tensor",
         mk("ties", {"weight": 1.0, "density": args.density}, {"normalize": True, "lambda": 1.0}),
         bm("ties", {"density": args.density, "threshold": "per_tensor", "scale": 1.0})),
    ]
    results = {"mergekit": mergekit_version(), "torch": torch.__version__, "suite": vars(args) | {"json": None},
               "cases": [run_case(n, exe, suite, m, b) for n, m, b in cases]}
    results["control"] = negative_control(
        suite, "ties_per_tensor", bm("ties", {"density": args.density, "threshold": "global", "scale": 1.0}))
    for c in results["cases"]:
        worst = max(c["tensors"], key=lambda r: r["max_ratio_to_bf16_tol"])
        print(f"\n== {c['case']}: {'PASS' if c['ok'] else 'FAIL'}  ({len(c['tensors'])} tensors; "
              f"mergekit {c['mergekit_s']} s, bmmstream {c['bmmstream_s']} s)")
        print(f"{'tensor':48s} {'max_abs':>10s} {'max_rel':>10s} {'/bf16 tol':>10s}")
        for r in c["tensors"]:
            print(f"{r['tensor']:48s} {r['max_abs']:10.3e} {r['max_rel']:10.3e} {r['max_ratio_to_bf16_tol']:10.3e}")
        print(f"worst: {worst['tensor']} at {worst['max_ratio_to_bf16_tol']:.3e} of the bf16 tolerance; "
              f"max |merged - base| = {c['max_abs_change_from_base']:.3e}")
    ctl = results["control"]
    print(f"\n{ctl['case']}: {ctl['tensors_failing']}/{ctl['tensors']} tensors outside the tolerance, "
          f"worst {ctl['worst_ratio_to_bf16_tol']:.3e} x tol")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(c["ok"] for c in results["cases"]) and results["control"]["tensors_failing"] else 1)


if __name__ == "__main__":
    main()
