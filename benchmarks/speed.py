"""Speed and memory against llm-compressor: SparseGPT, Wanda and D²Prune at 50% on SmolLM2-135M, side by side.

Both engines prune the same fp32 HF folder with the same calibration token ids (C4 windows drawn
once by ``d2prune.data.get_calibration`` and handed to both through a safetensors file), on the CPU,
one fresh subprocess per run (wall time and peak RSS from ``os.wait4``), the engines interleaved run
by run and each (engine, method) repeated ``--repeats`` times (median reported):

- ours: ``d2prune.prune`` (layer by layer, ``measure_error`` off) then ``save_pruned``, once per
  ``--ours-dtypes`` entry (``--compute-dtype``; bfloat16 is added by default where the CPU has AMX or
  AVX512-BF16); D²Prune (v_proj un-updated) is set against llm-compressor's SparseGPT;
- llm-compressor: ``oneshot(..., pipeline="sequential")`` with ``SparseGPTModifier`` /
  ``WandaPruningModifier`` (sparsity 0.5, unstructured, block 128, dampening 0.01, lm_head
  ignored), run by the interpreter of its own virtualenv (it pins its own transformers).

Every result is then scored by OUR evaluator (WikiText-2, the first K windows of the calibration
length) and its decoder-linear sparsity checked. A one-layer profile (torch.profiler, per aten op)
of our SparseGPT and Wanda shows where our time goes. Results: ``benchmarks/results/speed.json``
and the table in ``benchmarks/README.md``.

Setup of llm-compressor's virtualenv (once):

    python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1

Run:

    .venv/bin/python benchmarks/speed.py                     # SmolLM2-135M, 32×512 C4, 64 eval windows
    .venv/bin/python benchmarks/speed.py --model ../shared/models/aidreams260K --nsamples 4 \\
        --seqlen 64 --eval-windows 4 --no-readme            # dry run on the tiny model

This file is also the runner of one pruning (``--run ours|llmc``); it imports nothing but the
standard library at module level so that it runs under either virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
README = ROOT / "benchmarks" / "README.md"
MARK_BEGIN = "<!-- speed-table:begin -->"
MARK_END = "<!-- speed-table:end -->"
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
METHODS = ("sparsegpt", "wanda", "d2prune")
# llm-compressor has no D²Prune: our D²Prune is set against its SparseGPT (the goal).
PEER = {"sparsegpt": "sparsegpt", "wanda": "wanda", "d2prune": "sparsegpt"}


# --------------------------------------------------------------------------------------------------
# runners (one pruning per process)
# --------------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file

    import d2prune
    from d2prune.io.models import load_model, save_pruned

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32")
    ids = load_file(args.calib)["input_ids"]
    t1 = time.perf_counter()
    method = d2prune.D2PruneConfig(target_layers=["self_attn.v_proj"]) if args.method == "d2prune" else args.method
    config = d2prune.PruneConfig(
        method=method,
        sparsity=0.5,
        measure_error=False,
        progress=False,
        batch_size=args.batch_size,
        compute_dtype=args.compute_dtype,
    )
    if args.profile_layers:
        _keep_layers(model, args.profile_layers)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            report = d2prune.prune(model, ids, config)
        ops = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ops)
        top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        return {
            "phases_s": report.timings,
            "ops": [
                {
                    "op": e.key,
                    "self_cpu_s": e.self_cpu_time_total / 1e6,
                    "share": e.self_cpu_time_total / total,
                    "calls": e.count,
                }
                for e in top
            ],
        }
    report = d2prune.prune(model, ids, config)
    t2 = time.perf_counter()
    save_pruned(model, tokenizer, args.out, report.sparsity_record())
    t3 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "prune_s": t2 - t1,
        "save_s": t3 - t2,
        "phases_s": report.timings,
        "compute_dtype": report.compute_dtype,
        "threads": torch.get_num_threads(),
    }


def _keep_layers(model, n: int) -> None:
    """Cut the decoder stack to its first ``n`` layers (the profile looks at one layer's work)."""
    from d2prune.engine.architecture import find_decoder_stack

    stack = find_decoder_stack(model)
    del stack.layers[n:]
    model.config.num_hidden_layers = n


def run_llmc(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = load_file(args.calib)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t1 = time.perf_counter()
    phases = _time_llmc_phases()
    common = dict(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        recipe = SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    else:
        recipe = WandaPruningModifier(**common)
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
        batch_size=args.batch_size,
        pipeline="sequential",
    )
    t2 = time.perf_counter()
    # Plain safetensors + the source config: the result loads with any transformers, no
    # compressed-tensors wrapper in its config. A tied head is stored once, under the embedding's
    # name (named_parameters keeps the first), as save_pretrained does.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    persistent = set(model.state_dict())
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    tensors.update({n: b.detach().contiguous() for n, b in model.named_buffers() if n in persistent})
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in Path(args.model).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and not f.name.endswith(".index.json"):
            shutil.copyfile(f, out / f.name)
    t3 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "prune_s": t2 - t1,
        "save_s": t3 - t2,
        "phases_s": {**phases, "total": t2 - t1},
        "threads": torch.get_num_threads(),
    }


def _time_llmc_phases() -> dict[str, float]:
    """Seconds llm-compressor spends in its statistics hooks (Hessian / input-norm accumulation) and
    in its compress step (the OBS solve / Wanda mask), by wrapping the modifiers' methods; the
    forward passes are the rest of its prune time. Empty if its internals are not where expected."""
    import functools

    phases = {"statistics_hooks": 0.0, "prune": 0.0}
    try:
        from llmcompressor.modifiers.pruning.sparsegpt import base as sgpt
        from llmcompressor.modifiers.pruning.wanda import base as wanda
    except ImportError:
        return {}

    def timed(owner, name, key):
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                phases[key] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    for module, cls in ((sgpt, "SparseGPTModifier"), (wanda, "WandaPruningModifier")):
        klass = getattr(module, cls, None)
        if klass is not None:
            timed(klass, "calibrate_module", "statistics_hooks")
            timed(klass, "compress_modules", "prune")
    return phases


# --------------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------------


def subprocess_run(
    launcher,
    python: Path,
    engine: str,
    method: str,
    args: argparse.Namespace,
    calib: Path,
    out: Path,
    extra: list[str] | None = None,
    compute_dtype: str = "model",
) -> dict:
    """One runner process; its own report plus wall time and peak RSS."""
    info = out.with_suffix(".json")
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--run",
        engine,
        "--method",
        method,
        "--model",
        str(args.model),
        "--calib",
        str(calib),
        "--out",
        str(out),
        "--info",
        str(info),
        "--batch-size",
        str(args.batch_size),
        *(["--compute-dtype", compute_dtype] if engine == "ours" else []),
        *(extra or []),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if engine == "ours":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)  # nothing of our environment in theirs
    res = launcher.run(cmd, env)
    if res["returncode"] != 0:
        raise SystemExit(f"{engine} {method} failed:\n{res['output'][-5000:]}")
    shown = " ".join(shlex.quote(c) for c in cmd).replace(str(ROOT) + "/", "")
    return {
        "engine": engine if engine == "llmc" or compute_dtype == "model" else f"ours-{compute_dtype}",
        "method": method,
        "wall_s": res["wall_s"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "command": shown,
        **json.loads(info.read_text()),
    }


def medians(runs: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (engine, method): the median wall and prune time and phases, the largest peak RSS, and
    the perplexity and sparsity (measured on the first repeat)."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["engine"], r["method"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        phases = sorted({p for r in rs for p in r.get("phases_s", {})})
        out[key] = {
            "repeats": len(rs),
            "wall_s": statistics.median(r["wall_s"] for r in rs),
            "prune_s": statistics.median(r["prune_s"] for r in rs),
            "prune_s_all": [r["prune_s"] for r in rs],
            "phases_s": {p: statistics.median(r["phases_s"].get(p, 0.0) for r in rs) for p in phases},
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "ppl": next(r["ppl"] for r in rs if "ppl" in r),
            "sparsity": next(r["sparsity"] for r in rs if "sparsity" in r),
        }
    return out


def decoder_sparsity(folder: Path) -> float:
    from safetensors import safe_open

    zeros = total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():
                if ".layers." in key and key.endswith("proj.weight"):
                    t = fh.get_tensor(key)
                    zeros += int((t == 0).sum())
                    total += t.numel()
    return zeros / max(total, 1)


def perplexity(folder: Path, args: argparse.Namespace, loaded: tuple | None = None) -> float:
    from d2prune.data import get_eval_tokens
    from d2prune.evaluation.perplexity import evaluate_ppl
    from d2prune.io.models import load_model

    model, tokenizer = loaded or load_model(str(folder), dtype="float32")
    tokens = get_eval_tokens(tokenizer, "wikitext2", data_dir=args.data_dir)
    return evaluate_ppl(model, tokens, args.seqlen, max_windows=args.eval_windows, progress=False).ppl


def resolve_model(name: str) -> Path:
    """A local HF folder both engines can load; the SmolLM2 alias becomes d2prune's cached copy."""
    from d2prune.io.gguf import DEFAULT_MODEL, gguf_cache_dir, smollm2_gguf
    from d2prune.io.models import load_model

    if name.lower() == DEFAULT_MODEL and not Path(name).exists():
        folder = gguf_cache_dir(smollm2_gguf(), DEFAULT_MODEL)
        if not (folder / "config.json").is_file():
            load_model(DEFAULT_MODEL)  # dequantizes the GGUF once and caches it as a folder
        return folder
    return Path(name).expanduser().resolve()


def _engine_name(engine: str) -> str:
    if engine == "llmc":
        return "llm-compressor"
    return "d2prune" + (f" (--compute-dtype {engine.split('-', 1)[1]})" if "-" in engine else "")


def _phases(med: dict) -> str:
    p = med.get("phases_s", {})
    if "statistics" in p:  # ours: the pipeline's own timers
        return f"{p['statistics']:.1f} / {p['prune']:.1f} / {p['pruned_forward']:.1f}"
    if "statistics_hooks" in p:  # theirs: hooks and compress step timed, forwards are the rest
        rest = p["total"] - p["statistics_hooks"] - p["prune"]
        return f"hooks {p['statistics_hooks']:.1f} + forwards of both passes {rest:.1f} / {p['prune']:.1f}"
    return "–"


def table(results: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"
    lines = [
        f"Model `{results['model_name']}`, 50% unstructured, calibration {results['nsamples']}×{results['seqlen']} "
        f"C4 token ids (seed 0, the same file for both), batch {results['batch_size']}, CPU ({results['machine']}); "
        "perplexity by d2prune's "
        f"evaluator on the first {results['eval_windows']} WikiText-2 windows of {results['seqlen']} tokens "
        f"(dense: {results['dense_ppl']:.2f}). Median of {results.get('repeats', 1)} runs per engine, the engines "
        "interleaved run by run. Wall = whole process (imports, load, prune, save); prune = the pruning call "
        "alone; phases = statistics pass (forward + hooks) / solve or mask / pruned pass.",
        "",
        "| method | engine | wall (s) | prune (s) | phases (s) | peak RSS (MiB) | WikiText-2 ppl | sparsity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for med in results.get("medians", []):
        lines.append(
            f"| {med['method']} | {_engine_name(med['engine'])} | {med['wall_s']:.1f} | {med['prune_s']:.1f} "
            f"({', '.join(f'{t:.0f}' for t in med['prune_s_all'])}) | {_phases(med)} "
            f"| {mib(med['peak_rss_bytes'])} | {med['ppl']:.2f} | {med['sparsity']:.4f} |"
        )
    lines += [
        "",
        "| ours | against | time ours/theirs (wall) | (prune) | peak RSS ours/theirs | ppl ours/theirs − 1 |",
        "|---|---|---|---|---|---|",
    ]
    for m, ratio in results["ratios"].items():
        lines.append(
            f"| {m} | {ratio.get('peer', '')} | {ratio['wall']:.2f} | {ratio['prune']:.2f} | {ratio['rss']:.2f} "
            f"| {ratio['ppl'] * 100:+.2f}% |"
        )
    if results.get("profile"):
        lines += [
            "",
            "Where our time goes, one decoder layer (torch.profiler, self CPU time per op; phases from the "
            "pipeline's timers):",
            "",
        ]
        for m, prof in results["profile"].items():
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in prof["phases_s"].items() if k != "total")
            lines.append(
                f"- {m}: {phases}; top ops: "
                + ", ".join(f"`{o['op']}` {o['share'] * 100:.0f}%" for o in prof["ops"][:6])
            )
    lines += ["", f"Produced by `{results['command']}`; runner commands in `benchmarks/results/speed.json`."]
    return "\n".join(lines)


def benchmark(args: argparse.Namespace) -> None:
    from common import Launcher, replace_block

    launcher = Launcher()  # before this process loads torch and models (see common.py)
    import platform

    import torch
    from safetensors.torch import save_file

    from d2prune.data import get_calibration
    from d2prune.io.models import load_model

    llmc = Path(args.llmc_python)
    if not llmc.exists():
        raise SystemExit(f"{llmc} not found; set up llm-compressor's virtualenv first (see this file's docstring)")
    args.model = resolve_model(args.model_name)
    work = Path(tempfile.mkdtemp(prefix="speed-", dir=args.workdir))
    try:
        dense, tokenizer = load_model(str(args.model), dtype="float32")
        ids = get_calibration(
            tokenizer, "c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0, data_dir=args.data_dir
        )
        calib = work / "calibration.safetensors"
        save_file({"input_ids": ids.contiguous()}, str(calib))
        dense_ppl = perplexity(args.model, args, (dense, tokenizer))
        del dense
        machine = f"{os.cpu_count()} CPUs, torch {torch.__version__}, {platform.machine()}"
        results = {
            "model_name": args.model_name,
            "model": str(args.model),
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "eval_windows": args.eval_windows,
            "batch_size": args.batch_size,
            "dense_ppl": dense_ppl,
            "machine": machine,
            "calibration_sha256": _sha256(calib),
            "command": " ".join(["python", "benchmarks/speed.py", *sys.argv[1:]]),
            "repeats": args.repeats,
            "ours_dtypes": args.ours_dtypes,
            "runs": [],
            "ratios": {},
            "profile": {},
        }
        # Engines interleaved, run by run, so that a slow spell of the machine hits both; the
        # table reports each (engine, method)'s median over the repeats.
        engines = [("ours", Path(sys.executable), dt) for dt in args.ours_dtypes] + [("llmc", llmc, "model")]
        plan = []
        for method in args.methods:
            for engine, python, dtype in engines:
                if engine == "llmc" and PEER[method] != method:
                    continue  # llm-compressor has no such method: its peer's runs serve
                plan.append((method, engine, python, dtype))
        scored: set[tuple[str, str]] = set()
        for rep in range(args.repeats):
            for method, engine, python, dtype in plan:
                out = work / f"{engine}-{dtype}-{method}"
                print(f"[{rep + 1}/{args.repeats}] {engine} {method} ({dtype}) ...", flush=True)
                run = subprocess_run(launcher, python, engine, method, args, calib, out, compute_dtype=dtype)
                run["repeat"] = rep
                key = (run["engine"], method)
                if key not in scored:  # the weights are the same every repeat: score them once
                    run["ppl"] = perplexity(out, args)
                    run["sparsity"] = decoder_sparsity(out)
                    scored.add(key)
                print(
                    f"  wall {run['wall_s']:.1f} s, prune {run['prune_s']:.1f} s, peak RSS "
                    f"{run['peak_rss_bytes'] / 2**20:.0f} MiB" + (f", ppl {run['ppl']:.2f}" if "ppl" in run else ""),
                    flush=True,
                )
                results["runs"].append(run)
                shutil.rmtree(out, ignore_errors=True)
        results["medians"] = medians(results["runs"])
        for (engine, method), med in results["medians"].items():
            if engine == "llmc":
                continue
            peer = results["medians"].get(("llmc", PEER[method]))
            if peer is None:
                continue
            results["ratios"][f"{method} {engine}"] = {
                "peer": f"llm-compressor {PEER[method]}",
                "wall": med["wall_s"] / peer["wall_s"],
                "prune": med["prune_s"] / peer["prune_s"],
                "rss": med["peak_rss_bytes"] / peer["peak_rss_bytes"],
                "ppl": med["ppl"] / peer["ppl"] - 1,
            }
        results["medians"] = [{"engine": e, "method": m, **v} for (e, m), v in results["medians"].items()]
        for method in args.methods if args.profile else []:
            prof = subprocess_run(
                launcher,
                Path(sys.executable),
                "ours",
                method,
                args,
                calib,
                work / f"profile-{method}",
                ["--profile-layers", "1"],
            )
            results["profile"][method] = {"phases_s": prof["phases_s"], "ops": prof["ops"]}
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        launcher.close()
    text = table(results)
    print(text)
    if not args.no_readme:
        replace_block(README, MARK_BEGIN, MARK_END, text)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", dest="model_name", default="smollm2-135m", help="HF folder or smollm2-135m (default)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument(
        "--batch-size", type=int, default=1, help="calibration windows per forward, both engines (default 1)"
    )
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--llmc-python", default=str(LLMC_PYTHON), help="python of llm-compressor's virtualenv")
    p.add_argument("--workdir", default=None)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the one-layer profile")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-readme", action="store_true")
    p.add_argument("--repeats", type=int, default=3, help="runs per engine and method, interleaved (default 3)")
    p.add_argument(
        "--ours-dtypes",
        nargs="+",
        default=None,
        help="our --compute-dtype per row (default: model, plus bfloat16 where the CPU computes it fast)",
    )
    p.add_argument("--compute-dtype", default="model", help=argparse.SUPPRESS)
    # runner mode
    p.add_argument("--run", choices=["ours", "llmc"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--info", help=argparse.SUPPRESS)
    p.add_argument("--profile-layers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        args.model = args.model_name
        info = (run_ours if args.run == "ours" else run_llmc)(args)
        Path(args.info).write_text(json.dumps(info, indent=2))
        return
    if args.ours_dtypes is None:
        sys.path.insert(0, str(ROOT / "src"))
        from d2prune.engine.precision import fast_bfloat16

        args.ours_dtypes = ["model", *(["bfloat16"] if fast_bfloat16("cpu")[0] else [])]
    benchmark(args)


if __name__ == "__main__":
    main()
