"""Matmul throughput per dtype on this machine's CPU: what ``--compute-dtype`` can gain here.

The products a decoder layer of SmolLM2-135M runs (a 512-token window through its q/k/v/o, gate/up
and down projections, and the head over 49152 tokens of vocabulary) in float32, bfloat16 and
float16, with the CPU features that ``--compute-dtype auto`` reads. Results:
``benchmarks/results/dtype_matmul.json`` and the compute-dtype section of ``benchmarks/README.md``.

    .venv/bin/python benchmarks/dtype_matmul.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from d2prune.engine.precision import _cpu_flags, fast_bfloat16  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "dtype_matmul.json"
# (name, tokens, in, out): SmolLM2-135M's linears over one 512-token window, and its head.
SHAPES = [
    ("q/o_proj", 512, 576, 576),
    ("gate/up_proj", 512, 576, 1536),
    ("down_proj", 512, 1536, 576),
    ("lm_head", 512, 576, 49152),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def measure(tokens: int, cols: int, rows: int, dtype: torch.dtype, repeats: int) -> float:
    """Median GFLOP/s of ``F.linear`` (tokens × cols) · (rows × cols)ᵀ in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cols, generator=g).to(dtype)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    F.linear(x, w)  # warm-up (oneDNN picks its kernel)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - t0)
    return 2 * tokens * cols * rows / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args()
    fast, why = fast_bfloat16("cpu")
    flags = sorted(f for f in _cpu_flags() if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2", "f16c")))
    rows = []
    for name, tokens, cols, out in SHAPES:
        row = {"shape": name, "tokens": tokens, "in": cols, "out": out}
        for dtype in DTYPES:
            row[str(dtype).removeprefix("torch.")] = measure(tokens, cols, out, dtype, args.repeats)
        rows.append(row)
        print(
            f"{name:14s} " + "  ".join(f"{k} {row[k]:7.1f} GFLOP/s" for k in ("float32", "bfloat16", "float16")),
            flush=True,
        )
    result = {
        "command": "python benchmarks/dtype_matmul.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}",
        "cpu_flags": flags,
        "auto_picks": "bfloat16" if fast else "float32",
        "auto_reason": why,
        "rows": rows,
    }
    Path(args.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"--compute-dtype auto here: {result['auto_picks']} ({why}); CPU flags: {', '.join(flags) or 'none'}")


if __name__ == "__main__":
    main()
