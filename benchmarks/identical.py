"""Behaviour check for refactors: prune with every method, hash the pruned weights and the run record.

Run it on the commit before a refactor and on the commit after; the two JSON files must match
(same SHA-256 of every saved tensor, same ``run.json`` apart from timings, paths and versions):

    .venv/bin/python benchmarks/identical.py --out before.json            # on the old commit
    .venv/bin/python benchmarks/identical.py --out after.json --compare before.json

With ``--random``: the tiny random models of the test suite (every architecture of tests/conftest.py,
every method, through the Python API; a minute in all).

Cases: the tiny trained LLaMA of ../shared/models (every method, N:M, OWL, refit, the held-out
target search, --offload disk; seconds each) and, with ``--smollm2``, SmolLM2-135M at 50 % with each
method under the quick protocol (calibration 32 × 512 from C4, ``--no-measure-error``; minutes each).
Every run is a separate ``d2prune`` process with one intra-op thread, so sums happen in one fixed
order and the hashes do not depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "models" / "aidreams260K"

QUICK = ["--nsamples", "32", "--seqlen", "512", "--calib", "c4", "--seed", "0"]
TINY_CALIB = ["--nsamples", "8", "--seqlen", "64", "--calib", "c4", "--seed", "0"]

METHODS = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "d2prune": ["--method", "d2prune", "--target-layers", "self_attn.v_proj"],
    "pruner-zero": ["--method", "pruner-zero"],
    "alps": ["--method", "alps", "--alps-iters", "60"],
    "d2alps": ["--method", "d2alps", "--target-layers", "self_attn.v_proj", "--alps-iters", "60"],
    "ria": ["--method", "ria"],
    "ria-permute": ["--method", "ria", "--ria-permute"],
    "dsnot": ["--method", "dsnot"],
    "owl-wanda": ["--method", "wanda", "--sparsity-profile", "owl"],
    "sparsegpt-refit": ["--method", "sparsegpt", "--refit", "cg"],
}
# Only on the tiny model: the remaining paths through the engine.
TINY_EXTRA = {
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "d2prune-2:4": ["--method", "d2prune", "--target-layers", "self_attn.v_proj", "--pattern", "2:4"],
    "wanda-3:4": ["--method", "wanda", "--pattern", "3:4"],
    "alps-2:4": ["--method", "alps", "--pattern", "2:4", "--alps-iters", "60"],
    "d2prune-auto": ["--method", "d2prune", "--target-layers", "auto", "--heldout-windows", "4"],
    "owl-d2prune": ["--method", "d2prune", "--sparsity-profile", "owl"],
    "d2prune-refit-all": ["--method", "d2prune", "--refit", "cg", "--refit-target-layers"],
    "sparsegpt-offload": ["--method", "sparsegpt", "--offload", "disk"],
    "d2prune-offload": ["--method", "d2prune", "--offload", "disk", "--batch-size", "2"],
    "wanda-layers": ["--method", "wanda", "--layer-sparsities", "0.3", "0.5", "0.7", "0.6"],
    "dsnot-sparsegpt": ["--method", "dsnot", "--dsnot-base", "sparsegpt"],
    "ria-2:4": ["--method", "ria", "--pattern", "2:4", "--ria-permute"],
}
# Fields of run.json that legitimately differ between two runs of the same prune.
VOLATILE = {
    "timings",
    "prune_timings",
    "versions",
    "path",
    "output_dir",
    "command",
    "seconds",
    "wall_s",
    "started",
    "finished",
    "host",
    "model_dir",
    "cache_dir",
    "data_dir",
    "saved_model",
    "elapsed_s",
    "available_bytes",  # the machine's free memory when the offload decision was made
}


def tensor_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every tensor (name, dtype, shape and bytes) in a saved safetensors folder."""
    from safetensors import safe_open

    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in sorted(f.keys()):
                t = f.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
                out[name] = h.hexdigest()
    return out


def stable(record):
    """The run record without the fields that change from run to run."""
    if isinstance(record, dict):
        return {k: stable(v) for k, v in record.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(record, list):
        return [stable(v) for v in record]
    return record


def run_case(name: str, model: str, args: list[str], work: Path) -> dict:
    out = work / name.replace(":", "-")
    cmd = [
        str(Path(sys.executable).parent / "d2prune"),
        "prune",
        model,
        *args,
        "--sparsity",
        "0.5",
        "--eval",
        "none",
        "--no-measure-error",
        "--no-progress",
        "--output-dir",
        str(out),
        "--save-model",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    record = json.loads((out / "run.json").read_text())
    weights = tensor_hashes(out / "model")
    shutil.rmtree(out)
    digest = hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()
    print(f"{name:24s} {time.perf_counter() - t0:7.1f} s  weights {digest[:16]}", flush=True)
    return {"args": args, "weights_sha256": digest, "tensors": weights, "record": stable(record)}


# The tiny random models of the test suite (tests/conftest.py), pruned in-process through the API.
RANDOM_METHODS = {
    "magnitude": {},
    "wanda": {},
    "sparsegpt": {},
    "sparsegpt-2:4": {"pattern": "2:4"},
    "d2prune": {},
    "pruner-zero": {},
    "alps": {"admm_iters": 60},
    "d2alps": {"admm_iters": 60},
    "ria": {},
    "dsnot": {},
}


def random_cases() -> dict:
    """Every architecture of the test suite × every method, pruned through ``d2prune.prune``."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import d2prune
    from conftest import ARCH_KEYS, build_tiny_model, make_calibration_ids

    torch.set_num_threads(1)
    out = {}
    for arch in ARCH_KEYS:
        for label, options in RANDOM_METHODS.items():
            options = dict(options)
            pattern = options.pop("pattern", "unstructured")
            method = label.split("-2:4")[0]
            name = f"random/{arch}/{label}"
            model = build_tiny_model(arch, seed=0)
            try:
                config = d2prune.PruneConfig(
                    method=d2prune.METHODS[method](**options),
                    sparsity=0.5,
                    pattern=pattern,
                    batch_size=2,
                    measure_error=False,
                    progress=False,
                )
                report = d2prune.prune(model, make_calibration_ids(), config).to_dict()
            except d2prune.UserError as exc:
                out[name] = {"args": [method, pattern, options], "error": str(exc)}
                continue
            h = hashlib.sha256()
            for key, t in sorted(model.state_dict().items()):
                h.update(key.encode())
                h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            out[name] = {
                "args": [method, pattern, options],
                "weights_sha256": h.hexdigest(),
                "tensors": {},
                "record": stable(report),
            }
            print(f"{name:32s} weights {out[name]['weights_sha256'][:16]}", flush=True)
    return out


def compare(before: dict, after: dict) -> list[str]:
    problems = []
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            problems.append(f"{name}: missing after")
            continue
        if a.get("error") != b.get("error"):
            problems.append(f"{name}: error {b.get('error')!r} before, {a.get('error')!r} after")
            continue
        if "error" in b:
            continue
        if a["weights_sha256"] != b["weights_sha256"]:
            bad = [t for t in b["tensors"] if a["tensors"].get(t) != b["tensors"][t]]
            problems.append(f"{name}: weights differ in {len(bad)} tensors, e.g. {bad[:3]}")
        ra, rb = stable(a["record"]), stable(b["record"])  # files written before a field became volatile
        if ra != rb:
            keys = sorted(set(ra) | set(rb))
            diff = [k for k in keys if ra.get(k) != rb.get(k)]
            problems.append(f"{name}: run.json differs in {diff}")
    return problems


def report_against(reference: Path, results: dict) -> None:
    """Print every difference from the reference hashes; exit 1 if there is any."""
    problems = compare(json.loads(reference.read_text()), results)
    for p in problems:
        print("DIFFERENT", p)
    if problems:
        raise SystemExit(1)
    print(f"identical: {len(results)} cases")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the hashes")
    ap.add_argument("--compare", type=Path, help="hashes of the reference commit; exit 1 on any difference")
    ap.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M at 50 %% with each method")
    ap.add_argument("--only", nargs="*", help="case names to run (default all)")
    ap.add_argument("--random", action="store_true", help="only the tiny random models of the test suite (API)")
    a = ap.parse_args()
    if a.random:
        results = random_cases()
        a.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        if a.compare:
            problems = compare(json.loads(a.compare.read_text()), results)
            for p in problems:
                print("DIFFERENT", p)
            if problems:
                raise SystemExit(1)
            print(f"identical: {len(results)} cases")
        return
    cases = [(f"tiny/{n}", str(TINY), [*TINY_CALIB, *args]) for n, args in {**METHODS, **TINY_EXTRA}.items()]
    if a.smollm2:
        cases += [(f"smollm2/{n}", "smollm2-135m", [*QUICK, *args]) for n, args in METHODS.items()]
    if a.only:
        cases = [c for c in cases if c[0] in a.only]
    # Cases already in --out with the same arguments are kept (an interrupted run continues).
    done = json.loads(a.out.read_text()) if a.out.exists() else {}
    results = {}
    with tempfile.TemporaryDirectory(prefix="d2prune-identical-") as tmp:
        for name, model, args in cases:
            if name in done and done[name]["args"] == args:
                results[name] = done[name]
                continue
            results[name] = run_case(name, model, args, Path(tmp))
            a.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if a.compare:
        report_against(a.compare, results)


if __name__ == "__main__":
    main()
