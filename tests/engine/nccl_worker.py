"""One rank of test_cuda_torchrun.py (not a test module itself), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 nccl_worker.py OUT [DEVICE]

Joins the process group for DEVICE (default cuda: NCCL, rank r on cuda:LOCAL_RANK; cpu: gloo, to
rehearse without GPUs), prunes a fresh tiny random model once per case of ``CASES`` and saves its
decoder weights and report summary as OUT/<case>.rank<r>.pt, plus OUT/world.rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import d2prune  # noqa: E402
from conftest import build_tiny_model, decoder_weights, make_calibration_ids  # noqa: E402
from d2prune.engine import distributed  # noqa: E402

WINDOWS, TOKENS = 7, 32  # 7 windows: the two ranks get 3 and 4 (an uneven split)
CASES: dict[str, dict] = {
    "sparsegpt": dict(method="sparsegpt"),
    "wanda": dict(method="wanda"),
    "d2prune-2:4": dict(method="d2prune", pattern="2:4"),
    "pruner-zero": dict(method="pruner-zero"),
    "alps": dict(method="alps"),
}


def prune_case(name: str, device: str) -> dict:
    model = build_tiny_model("llama-gqa", seed=0)
    config = d2prune.PruneConfig(device=device, progress=False, **CASES[name])
    report = d2prune.prune(model, make_calibration_ids(WINDOWS, TOKENS), config)
    return {
        "weights": decoder_weights(model),
        "summary": {"nsamples": report.nsamples, "overall_sparsity": report.overall_sparsity},
    }


def main(out: Path, device: str) -> None:
    torch.set_num_threads(1)
    world, dev = distributed.init_from_env(device, 120.0)
    seen = {"rank": world.rank, "size": world.size, "device": dev}
    if torch.distributed.is_initialized():
        seen["backend"] = str(torch.distributed.get_backend())
    (out / f"world.rank{world.rank}.json").write_text(json.dumps(seen))
    for name in CASES:
        torch.save(prune_case(name, dev), out / f"{name}.rank{world.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else os.environ.get("NCCL_WORKER_DEVICE", "cuda"))
