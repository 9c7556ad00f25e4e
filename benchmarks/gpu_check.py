"""The GPU check (issue #15): the CUDA paths of d2prune on one NVIDIA GPU, written to one JSON.

``scripts/gpu_check.sh`` runs this after the tests marked ``cuda``; docs/gpu.md says what is checked
and how to read the result. Four parts, each in its own try/except (a failing part records its error
and the others still run):

* ``tiny``: the tiny trained LLaMA (``--tiny-model``, default ``../shared/models/aidreams260K``) pruned
  by a few methods on the CPU and on the device from the same calibration; mask agreement and the
  relative perplexity difference against the CPU result, computed here, not stored numbers.
* ``semi_structured``: ``torch.sparse.to_sparse_semi_structured`` 2:4 matmuls against dense
  ``F.linear`` on the linear shapes of 7B- and 70B-class LLaMA models (CUDA events, median of N).
* ``prefill``: a whole synthetic 1B-class LLaMA, 2:4-pruned by d2prune, prefilled with dense weights
  and with every decoder linear converted to semi-structured 2:4.
* ``methods``: every registered method (default options, 50 %; SparseGPT also 2:4) on a synthetic
  LLaMA of 1B-class layer shapes in bf16: per-phase times, peak device memory, achieved sparsity.
  The part runs last and stops starting methods once the time budget is spent (recorded as
  skipped). It prunes ``--layers`` decoder layers (default 4 of the 1B model's 16): per-layer times
  are what the check is after, and four layers keep all methods inside the budget.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu_check.json            # on a GPU
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --small --out x.json   # CPU rehearsal

Exit status: 0 when no part failed (skipped parts are fine), 1 otherwise. The JSON is rewritten
after every part and method, so a run stopped from outside still leaves what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TINY = ROOT.parent / "shared" / "models" / "aidreams260K"
TINY_ENV = "D2PRUNE_TINY_MODEL"
SCHEMA = 1
# In run order: the quick correctness check first, the budgeted methods part last.
PARTS = ("tiny", "semi_structured", "prefill", "methods")

# LLaMA-3.2-1B's decoder shapes (GQA 32/8 heads, head dim 64) with a LLaMA-2 vocabulary.
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=4096,
)
# ``--small``: a shape that runs every method in about a second on a CPU.
LLAMA_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)

# (label, out_features, in_features) of the linears of 7B- and 70B-class LLaMA models.
LINEAR_SHAPES = [
    ("7B q/k/v/o", 4096, 4096),
    ("7B gate/up", 11008, 4096),
    ("7B down", 4096, 11008),
    ("70B q/o", 8192, 8192),
    ("70B k/v (GQA)", 1024, 8192),
    ("70B gate/up", 28672, 8192),
    ("70B down", 8192, 28672),
]

SMALL_LINEAR_SHAPES = [("small square", 64, 64), ("small down", 64, 128)]

# Cheap and central methods first, so that a spent budget drops the slow ones (ALPS's ADMM).
METHOD_ORDER = ["magnitude", "wanda", "sparsegpt", "sparsegpt-2:4", "d2prune", "pruner-zero", "ria", "dsnot"]
SLOW_LAST = ["alps", "d2alps"]
TINY_METHODS = ["magnitude", "wanda", "sparsegpt", "d2prune"]
# --compute-dtype on the device against the float32 CPU result: bf16 forwards move the statistics,
# so only the perplexity is held to a (looser) limit; the mask agreement is recorded.
TINY_COMPUTE_DTYPES = [("sparsegpt", "bfloat16"), ("d2prune", "auto")]
TINY_MAX_PPL_REL_DIFF_HALF = 0.03
# CPU and GPU float32 round differently, and an OBS update carries a flipped choice into later
# columns and layers. On the CPU a 1e-6 relative perturbation of the weights leaves these four
# methods' masks identical and the perplexity within 4e-7, so the limits leave wide headroom.
# (ALPS is left out: its ADMM support moves by ~1.3 % under the same perturbation.)
TINY_MIN_AGREEMENT = 0.99
TINY_MAX_PPL_REL_DIFF = 0.01
# A semi-structured product is the dense one up to bf16 rounding (~0.4 % of the largest entry) and
# a whole prefill compounds that over 16 layers; a broken kernel is off by the size of the output.
SEMI_MAX_REL_ERR = 0.05
PREFILL_MAX_REL_DIFF = 0.25


class Skip(Exception):
    """A part or run that cannot run here, for a stated reason; not a failure."""


@dataclass
class Settings:
    """What one run checks and how big it is; ``small`` shrinks every shape for a CPU rehearsal."""

    device: str = "cuda"
    small: bool = False
    out: str = "gpu_check.json"
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    tiny_model: str = ""
    layers: int = 4
    nsamples: int = 32
    seqlen: int = 512
    budget_s: float = 170.0
    methods_budget_s: float = 150.0
    tokens: int = 4096
    prefill_tokens: int = 4096
    reps: int = 20
    warmup: int = 5
    seed: int = 0
    pytest_rc: int | None = None
    pytest_log: str | None = None

    def __post_init__(self) -> None:
        if self.small:
            self.layers, self.nsamples, self.seqlen = 2, 4, 32
            self.tokens, self.prefill_tokens, self.reps, self.warmup = 64, 64, 3, 1


# --------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak allocated device memory since ``reset_peak`` (None on the CPU, which has no such counter)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def free_device(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, reps: int) -> dict[str, float]:
    """Median and min of ``reps`` timed calls after ``warmup`` untimed ones: CUDA events on a GPU
    (device time, no launch gaps between calls counted), the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": reps}


def llama_config(shape: dict[str, int], layers: int | None = None):
    from transformers import LlamaConfig

    options = {**shape, **({"num_hidden_layers": layers} if layers else {})}
    return LlamaConfig(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **options)


def build_llama(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int, layers: int | None = None):
    """A LLaMA with random weights (transformers' init, N(0, 0.02²)) built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, layers), dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def random_ids(windows: int, tokens: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (windows, tokens), generator=g, dtype=torch.long)


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear of the decoder stack by full module path (what d2prune prunes)."""
    from d2prune.engine.architecture import find_decoder_stack, find_linears

    stack = find_decoder_stack(model)
    return {
        f"{stack.path}.{i}.{name}": lin
        for i, layer in enumerate(stack.layers)
        for name, lin in find_linears(layer).items()
    }


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, Any] = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors", "numpy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {
            "type": device.type,
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
    props = torch.cuda.get_device_properties(device)
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return {
        "type": "cuda",
        "name": props.name,
        "capability": list(torch.cuda.get_device_capability(device)),
        "memory_gib": props.total_memory / 2**30,
        "multiprocessors": props.multi_processor_count,
        "device_count": torch.cuda.device_count(),
        "cusparselt": cusparselt.version() if cusparselt is not None and cusparselt.is_available() else None,
    }


# --------------------------------------------------------------------------------------------------
# part: every method on a synthetic LLaMA of 1B-class shapes
# --------------------------------------------------------------------------------------------------


def method_cases() -> list[tuple[str, dict[str, Any]]]:
    """(label, PruneConfig keyword arguments) for every registered method with its default options,
    and SparseGPT at 2:4; a method registered later joins between the listed ones and the slow ones."""
    from d2prune.methods import METHODS

    names = [m for m in METHOD_ORDER if m.split("-2:4")[0] in METHODS]
    names += sorted(m for m in METHODS if m not in METHOD_ORDER and m not in SLOW_LAST)
    names += [m for m in SLOW_LAST if m in METHODS]
    cases = []
    for label in names:
        if label.endswith("-2:4"):
            cases.append((label, {"method": label.removesuffix("-2:4"), "pattern": "2:4"}))
        else:
            cases.append((label, {"method": label, "sparsity": 0.5}))
    return cases


def part_methods(settings: Settings, record: Callable[[dict], None], deadline: float) -> dict[str, Any]:
    """Prune a fresh copy of the synthetic model with every method; per-phase times and memory."""
    import d2prune

    device = torch.device(settings.device)
    dtype = torch.float32 if settings.small else torch.bfloat16
    shape = LLAMA_SMALL if settings.small else LLAMA_1B
    t0 = time.perf_counter()
    model = build_llama(shape, device, dtype, settings.seed, settings.layers)
    dense = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    calibration = random_ids(settings.nsamples, settings.seqlen, shape["vocab_size"], settings.seed)
    probe = calibration[:1].to(device)
    result: dict[str, Any] = {
        "model": {**shape, "num_hidden_layers": settings.layers, "dtype": str(dtype).removeprefix("torch.")},
        "pruned_layers": settings.layers,
        "calibration": {"windows": settings.nsamples, "tokens": settings.seqlen, "ids": "random, seed 0"},
        "build_s": time.perf_counter() - t0,
        "runs": [],
    }
    record(result)
    for label, options in method_cases():
        run: dict[str, Any] = {"name": label, **{k: str(v) for k, v in options.items()}}
        result["runs"].append(run)
        # Start a method only with twice the longest run so far left, so that the hard time limit
        # of gpu_check.sh does not stop one in the middle.
        longest = max((r.get("seconds", 0.0) for r in result["runs"]), default=0.0)
        left = deadline - time.monotonic()
        if left < 2 * longest or left <= 0:
            run.update(
                status="skipped", reason=f"time budget: {max(left, 0):.0f} s left, the longest run took {longest:.0f} s"
            )
            record(result)
            continue
        run["status"] = "running"  # what a run stopped from outside shows
        record(result)
        model.load_state_dict(dense)
        reset_peak(device)
        t1 = time.perf_counter()
        try:
            config = d2prune.PruneConfig(device=str(device), progress=False, **options)
            report = d2prune.prune(model, calibration, config)
            synchronize(device)
            with torch.inference_mode():
                finite = bool(torch.isfinite(model(input_ids=probe).logits).all())
            run.update(
                status="ok" if finite else "failed",
                seconds=time.perf_counter() - t1,
                timings=report.timings,
                per_layer_s={k: v / settings.layers for k, v in report.timings.items()},
                peak_mib=peak_mib(device),
                overall_sparsity=report.overall_sparsity,
                nm_structure_ok=report.nm_ok,
                mean_relative_error=_mean([lin.relative_error for lin in report.linears]),
                finite_logits=finite,
            )
            if not finite:
                run["error"] = "the pruned model's logits are not finite"
            elif report.nm_ok is False:
                run.update(status="failed", error="the 2:4 structure does not hold")
        except Exception as exc:  # one method's failure is recorded; the others still run
            run.update(status="failed", seconds=time.perf_counter() - t1, error=describe(exc))
        record(result)
    del model, dense
    free_device(device)
    failed = [r["name"] for r in result["runs"] if r["status"] == "failed"]
    if failed:
        result["error"] = f"failed: {', '.join(failed)}"
    return result


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


# --------------------------------------------------------------------------------------------------
# part: the tiny trained model, CPU against the device
# --------------------------------------------------------------------------------------------------


def tiny_model_path(settings: Settings) -> Path:
    return Path(settings.tiny_model or os.environ.get(TINY_ENV) or DEFAULT_TINY).expanduser()


@torch.no_grad()
def sample_text(model: torch.nn.Module, windows: int, tokens: int, seed: int) -> torch.Tensor:
    """Token windows sampled from ``model`` itself on the CPU (seeded, temperature 1, from BOS): text
    of its own domain, so the check needs no data files and both devices see the same ids."""
    g = torch.Generator().manual_seed(seed)
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
    ids = torch.full((windows, 1), bos, dtype=torch.long)
    for _ in range(tokens - 1):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def mask_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Fraction of weights that are zero in both or non-zero in both."""
    same = total = 0
    for name, w in a.items():
        other = b[name].to(w.device)
        same += int(((w == 0) == (other == 0)).sum())
        total += w.numel()
    return same / max(total, 1)


def weight_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((w.double() - b[n].double().to(w.device)).norm() ** 2) for n, w in a.items())
    den = sum(float(w.double().norm() ** 2) for w in a.values())
    return math.sqrt(num / max(den, 1e-30))


def part_tiny(settings: Settings, record: Callable[[dict], None]) -> dict[str, Any]:
    """The tiny trained model pruned on the CPU and on the device; how far the device result is."""
    import d2prune
    from d2prune.evaluation.perplexity import evaluate_ppl

    path = tiny_model_path(settings)
    if not (path / "config.json").is_file():
        raise Skip(f"no tiny model at {path} (set {TINY_ENV} or --tiny-model to the aidreams260K folder)")
    from transformers import AutoModelForCausalLM

    device = torch.device(settings.device)
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    base.config.use_cache = False
    seqlen = min(128, base.config.max_position_embeddings or 128) if not settings.small else 32
    windows = (16, 8) if not settings.small else (4, 4)
    calib = sample_text(base, windows[0], seqlen, settings.seed)
    heldout = sample_text(base, windows[1], seqlen, settings.seed + 1)

    def ppl(model: torch.nn.Module, on: torch.device) -> float:
        model.to(on)
        try:
            return evaluate_ppl(model, heldout, seqlen, batch_size=4, progress=False).ppl
        finally:
            model.to("cpu")

    result: dict[str, Any] = {
        "model": str(path),
        "calibration": {"windows": windows[0], "tokens": seqlen, "ids": "sampled from the model, seed 0"},
        "heldout": {"windows": windows[1], "tokens": seqlen, "ids": "sampled from the model, seed 1"},
        "limits": {"min_mask_agreement": TINY_MIN_AGREEMENT, "max_ppl_rel_diff": TINY_MAX_PPL_REL_DIFF},
        "dense_ppl": {"cpu": ppl(base, torch.device("cpu")), "device": ppl(base, device)},
        "runs": [],
    }
    record(result)
    cases = [(m, "model") for m in TINY_METHODS] + TINY_COMPUTE_DTYPES
    for method, compute in cases:
        run: dict[str, Any] = {"method": method, "compute_dtype": compute}
        result["runs"].append(run)
        try:
            pruned = []
            for second, on in enumerate(("cpu", settings.device)):
                model = copy.deepcopy(base)  # on the CPU; the engine moves each layer to ``on`` (as the CLI)
                config = d2prune.PruneConfig(
                    method=method,
                    sparsity=0.5,
                    device=on,
                    progress=False,
                    compute_dtype=compute if second else "model",  # the CPU reference: float32
                )
                report = d2prune.prune(model, calib, config)
                weights = {n: lin.weight.detach().clone() for n, lin in decoder_linears(model).items()}
                pruned.append((weights, ppl(model, torch.device(on))))
            run["compute_dtype_ran"] = report.compute_dtype
            (w_cpu, ppl_cpu), (w_dev, ppl_dev) = pruned
            agreement = mask_agreement(w_cpu, w_dev)
            rel = abs(ppl_dev - ppl_cpu) / ppl_cpu
            if compute == "model":
                ok = agreement >= TINY_MIN_AGREEMENT and rel <= TINY_MAX_PPL_REL_DIFF
            else:
                ok = rel <= TINY_MAX_PPL_REL_DIFF_HALF
            run.update(
                status="ok" if ok else "failed",
                mask_agreement=agreement,
                weight_rel_diff=weight_rel_diff(w_cpu, w_dev),
                ppl_cpu=ppl_cpu,
                ppl_device=ppl_dev,
                ppl_rel_diff=rel,
            )
            if not ok:
                run["error"] = "the device result is farther from the CPU result than the limits"
        except Exception as exc:
            run.update(status="failed", error=describe(exc))
        record(result)
    failed = [f"{r['method']} ({r['compute_dtype']})" for r in result["runs"] if r["status"] != "ok"]
    if failed:
        result["error"] = f"failed: {', '.join(failed)}"
    return result


# --------------------------------------------------------------------------------------------------
# parts: 2:4 semi-structured matmuls and a whole prefill
# --------------------------------------------------------------------------------------------------


def require_semi_structured(device: torch.device) -> None:
    """Semi-structured sparse kernels exist for CUDA GPUs of compute capability 8.0 and later only."""
    if device.type != "cuda":
        raise Skip("torch.sparse.to_sparse_semi_structured needs a CUDA GPU (compute capability >= 8.0)")
    if torch.cuda.get_device_capability(device) < (8, 0):
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise Skip(f"semi-structured 2:4 kernels need compute capability >= 8.0, this GPU has {cap}")


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the 2 smallest-magnitude entries of every 4 consecutive inputs zeroed."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(rows, cols)


def semi_backends() -> list[str]:
    """The semi-structured backends to measure, the default first: ``to_sparse_semi_structured``
    uses cuSPARSELt unless ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set, so without
    cuSPARSELt in this torch only CUTLASS (forced) can run."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return ["cusparselt", "cutlass"]
    return ["cutlass"]


def part_semi_structured(settings: Settings, record: Callable[[dict], None]) -> dict[str, Any]:
    """Dense ``F.linear`` against the same 2:4 weight in semi-structured form, per shape and backend.
    The default backend must work on every shape; the other one is measured for information."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    device = torch.device(settings.device)
    require_semi_structured(device)
    dtype = torch.bfloat16
    backends = semi_backends()
    result: dict[str, Any] = {
        "dtype": "bfloat16",
        "tokens": settings.tokens,
        "default_backend": backends[0],
        "timing": f"CUDA events, median of {settings.reps} after {settings.warmup} warm-ups",
        "runs": [],
    }
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS
    g = torch.Generator(device=device).manual_seed(settings.seed)
    try:
        for backend in backends:
            SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
            for label, out_f, in_f in SMALL_LINEAR_SHAPES if settings.small else LINEAR_SHAPES:
                run: dict[str, Any] = {"shape": label, "out": out_f, "in": in_f, "backend": backend}
                result["runs"].append(run)
                try:
                    w = two_four(torch.randn(out_f, in_f, device=device, dtype=dtype, generator=g) * 0.02)
                    x = torch.randn(settings.tokens, in_f, device=device, dtype=dtype, generator=g)
                    dense = time_ms(lambda w=w, x=x: F.linear(x, w), device, settings.warmup, settings.reps)
                    t0 = time.perf_counter()
                    ws = to_sparse_semi_structured(w)
                    synchronize(device)
                    convert_ms = (time.perf_counter() - t0) * 1e3
                    sparse = time_ms(lambda ws=ws, x=x: F.linear(x, ws), device, settings.warmup, settings.reps)
                    ref, got = F.linear(x, w).float(), F.linear(x, ws).float()
                    flops = 2.0 * settings.tokens * out_f * in_f
                    err = float((got - ref).abs().max() / ref.abs().max())
                    run.update(
                        status="ok" if err <= SEMI_MAX_REL_ERR else "failed",
                        tensor_class=type(ws).__name__,
                        dense_ms=dense["median_ms"],
                        sparse_ms=sparse["median_ms"],
                        speedup=dense["median_ms"] / sparse["median_ms"],
                        dense_tflops=flops / dense["median_ms"] / 1e9,
                        convert_ms=convert_ms,
                        max_rel_err=err,
                    )
                    if err > SEMI_MAX_REL_ERR:
                        run["error"] = (
                            f"the sparse product differs from the dense one by {err:.3g} of its largest entry"
                        )
                    del w, x, ws, ref, got
                except Exception as exc:
                    run.update(status="failed", error=describe(exc))
                record(result)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced
    bad = [f"{r['shape']} ({r['backend']})" for r in result["runs"] if r["status"] != "ok"]
    if any(r["status"] != "ok" and r["backend"] == backends[0] for r in result["runs"]):
        result["error"] = f"failed: {', '.join(bad)}"
    elif bad:
        result["note"] = f"the non-default backend failed on: {', '.join(bad)}"
    free_device(device)
    return result


def part_prefill(settings: Settings, record: Callable[[dict], None]) -> dict[str, Any]:
    """A whole 16-layer 1B-class LLaMA (bf16), 2:4-pruned by d2prune (magnitude), prefilled with its
    dense-stored weights and then with every decoder linear in semi-structured form."""
    from torch.sparse import to_sparse_semi_structured

    import d2prune

    device = torch.device(settings.device)
    require_semi_structured(device)
    shape = LLAMA_SMALL if settings.small else LLAMA_1B
    model = build_llama(shape, device, torch.bfloat16, settings.seed)
    calibration = random_ids(2, min(128, settings.seqlen), shape["vocab_size"], settings.seed)
    t0 = time.perf_counter()
    report = d2prune.prune(
        model, calibration, d2prune.PruneConfig(method="magnitude", pattern="2:4", device=str(device), progress=False)
    )
    synchronize(device)
    ids = random_ids(1, settings.prefill_tokens, shape["vocab_size"], settings.seed + 1).to(device)
    result: dict[str, Any] = {
        "model": {**shape, "dtype": "bfloat16"},
        "prompt_tokens": settings.prefill_tokens,
        "prune_2_4_magnitude_s": time.perf_counter() - t0,
        "nm_structure_ok": report.nm_ok,
        "timing": f"CUDA events, median of {max(3, settings.reps // 4)} after {settings.warmup} warm-ups",
    }
    record(result)

    def forward() -> torch.Tensor:
        # Only the last position's logits, as a serving prefill computes.
        return model(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    reps = max(3, settings.reps // 4)
    with torch.inference_mode():
        dense_logits = forward().float()
        dense = time_ms(forward, device, settings.warmup, reps)
    linears = decoder_linears(model)
    t1 = time.perf_counter()
    with torch.no_grad():  # not inference mode: the new parameters stay ordinary tensors
        for lin in linears.values():
            lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
    synchronize(device)
    convert_s = time.perf_counter() - t1
    with torch.inference_mode():
        sparse_logits = forward().float()
        sparse = time_ms(forward, device, settings.warmup, reps)
    result.update(
        converted_linears=len(linears),
        convert_s=convert_s,
        dense_ms=dense["median_ms"],
        sparse_ms=sparse["median_ms"],
        speedup=dense["median_ms"] / sparse["median_ms"],
        logits_max_rel_diff=float((sparse_logits - dense_logits).abs().max() / dense_logits.abs().max()),
        tokens_per_s_dense=settings.prefill_tokens / dense["median_ms"] * 1e3,
        tokens_per_s_sparse=settings.prefill_tokens / sparse["median_ms"] * 1e3,
    )
    if not bool(torch.isfinite(sparse_logits).all()):
        result["error"] = "the semi-structured model's logits are not finite"
    elif result["logits_max_rel_diff"] > PREFILL_MAX_REL_DIFF:
        result["error"] = f"the semi-structured model's logits differ by {result['logits_max_rel_diff']:.3g}"
    return result  # the model goes with this frame; run_checks then empties the device cache


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def describe(exc: BaseException) -> str:
    """One line: the exception's type and message, and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}"


PYTEST_TOTALS = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed)\b.* in [\d.]+s")


def pytest_summary(settings: Settings) -> dict[str, Any] | None:
    """The result of the ``pytest -m cuda`` run that gpu_check.sh made before this one, if any."""
    if settings.pytest_rc is None:
        return None
    lines = []
    if settings.pytest_log and Path(settings.pytest_log).is_file():
        lines = [ln.strip() for ln in Path(settings.pytest_log).read_text(errors="replace").splitlines() if ln.strip()]
    rc = settings.pytest_rc
    # pytest: 0 passed, 5 nothing collected (every cuda test deselected); 124: stopped by `timeout`.
    status = "ok" if rc in (0, 5) else "failed"
    totals = [ln for ln in lines if PYTEST_TOTALS.search(ln)]
    out = {"status": status, "returncode": rc, "summary": (totals or lines or [""])[-1].strip("= ")}
    if rc == 124:
        out["error"] = "pytest ran past its time limit"
    elif status == "failed":
        out["error"] = f"pytest exited with {rc}: {out['summary']}"
    skipped = [ln for ln in lines if ln.startswith("SKIPPED")]
    if skipped:
        out["skipped"] = skipped[:20]
    return out


def run_checks(settings: Settings) -> dict[str, Any]:
    """Run the chosen parts; returns the whole result (also written to ``settings.out``)."""
    started = time.monotonic()
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available (torch.cuda.is_available() is False)")
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": asdict(settings),
        "versions": versions(),
        "device": device_info(device),
        "parts": {},
    }
    tests = pytest_summary(settings)
    if tests is not None:
        result["parts"]["pytest_cuda"] = tests
    out = Path(settings.out)

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        tmp.replace(out)

    for name in PARTS:
        if name not in settings.parts:
            continue
        entry: dict[str, Any] = {"status": "running"}
        result["parts"][name] = entry

        def record(partial: dict, entry: dict = entry) -> None:
            entry.update(partial)
            write()

        t0 = time.perf_counter()
        try:
            if name == "methods":
                # What is left of the whole budget, at most the part's own.
                remaining = settings.budget_s - (time.monotonic() - started)
                deadline = time.monotonic() + max(0.0, min(settings.methods_budget_s, remaining))
                entry["budget_s"] = max(0.0, min(settings.methods_budget_s, remaining))
                done = PART_FUNCTIONS[name](settings, record, deadline)
            else:
                done = PART_FUNCTIONS[name](settings, record)
            entry.update(done)
            entry["status"] = "failed" if entry.get("error") else "ok"
        except Skip as exc:
            entry.update(status="skipped", reason=str(exc))
        except Exception as exc:  # a broken part is recorded; the next one still runs
            entry.update(status="failed", error=describe(exc))
            entry["traceback"] = traceback.format_exc(limit=8).splitlines()[-12:]
        entry["seconds"] = time.perf_counter() - t0
        free_device(device)
        write()
    result["seconds"] = time.monotonic() - started
    result["failed"] = [n for n, p in result["parts"].items() if p["status"] == "failed"]
    result["ok"] = not result["failed"]
    write()
    return result


PART_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "tiny": part_tiny,
    "semi_structured": part_semi_structured,
    "prefill": part_prefill,
    "methods": part_methods,
}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: each part's status and its headline numbers."""
    lines = []
    for name, part in result["parts"].items():
        head = f"{name}: {part['status']}"
        detail = part.get("error") or part.get("reason") or ""
        if name == "methods":
            runs = part.get("runs", [])
            done = [r for r in runs if r.get("status") == "ok"]
            detail = detail or f"{len(done)}/{len(runs)} methods ok"
            skipped = [r["name"] for r in runs if r.get("status") == "skipped"]
            if skipped:
                detail += f"; skipped for time: {', '.join(skipped)}"
        elif name == "tiny" and part.get("runs"):
            worst = min((r.get("mask_agreement", 0.0) for r in part["runs"]), default=0.0)
            detail = detail or f"lowest mask agreement {worst:.4f}"
        elif name == "semi_structured" and part.get("runs"):
            speedups = [
                f"{r['shape']} {r['speedup']:.2f}x"
                for r in part["runs"]
                if r.get("backend") == part.get("default_backend") and "speedup" in r
            ]
            detail = detail or "speedup " + ", ".join(speedups)
        elif name == "prefill" and "speedup" in part:
            detail = detail or f"speedup {part['speedup']:.2f}x ({part['dense_ms']:.1f} -> {part['sparse_ms']:.1f} ms)"
        lines.append(f"  {head}" + (f" - {detail}" if detail else ""))
    return lines


def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_out = str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"
    p.add_argument("--device", default="cuda", help="compute device (default cuda)")
    p.add_argument("--small", action="store_true", help="tiny shapes everywhere: a quick rehearsal, e.g. on a CPU")
    p.add_argument(
        "--out", default=default_out, help="the JSON to write (default $OUT/gpu_check.json, else ./gpu_check.json)"
    )
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default all)")
    p.add_argument(
        "--tiny-model", default="", help=f"the tiny trained LLaMA folder (default ${TINY_ENV}, else {DEFAULT_TINY})"
    )
    p.add_argument(
        "--layers",
        type=int,
        default=4,
        help="decoder layers of the synthetic 1B model in the methods part (default 4 of 16)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=170.0,
        help="seconds for all parts; the methods part gets what is left (default 170)",
    )
    p.add_argument(
        "--methods-budget-s", type=float, default=150.0, help="at most this long for the methods part (default 150)"
    )
    p.add_argument(
        "--tokens", type=int, default=4096, help="tokens per matmul in the semi-structured part (default 4096)"
    )
    p.add_argument("--pytest-rc", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pytest-log", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    settings = Settings(
        device=a.device,
        small=a.small,
        out=a.out,
        parts=list(a.parts),
        tiny_model=a.tiny_model,
        budget_s=a.budget_s,
        methods_budget_s=a.methods_budget_s,
        pytest_rc=a.pytest_rc,
        pytest_log=a.pytest_log,
    )
    if not a.small:
        settings.layers, settings.tokens = a.layers, a.tokens
    return settings


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run_checks(settings)
    print(f"gpu_check: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s -> {settings.out}")
    print("\n".join(summary_lines(result)))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
