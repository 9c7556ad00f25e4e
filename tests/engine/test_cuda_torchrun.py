"""torchrun with NCCL (marked ``cuda``; needs two GPUs, skipped otherwise): two ranks on two GPUs
prune like one process on the CPU, and every rank ends with the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_pruned_alike

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nccl_worker  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2,
        reason="NCCL across ranks needs two CUDA GPUs",
    ),
]


@pytest.fixture(scope="module")
def two_gpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nccl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(HERE / "nccl_worker.py"),
            str(out),
            "cuda",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_ranks_use_nccl_on_their_own_gpus(two_gpus):
    seen = [json.loads((two_gpus / f"world.rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in seen] == [0, 1] and all(s["size"] == 2 for s in seen)
    assert all(s["backend"] == "nccl" for s in seen)
    assert [s["device"] for s in seen] == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("case", list(nccl_worker.CASES))
def test_two_gpus_prune_like_one_cpu_process(two_gpus, case):
    ranks = [torch.load(two_gpus / f"{case}.rank{r}.pt", weights_only=True) for r in range(2)]
    for name, w in ranks[0]["weights"].items():  # every rank ends with the same weights
        assert torch.equal(w, ranks[1]["weights"][name]), name
    one = nccl_worker.prune_case(case, "cpu")
    admm = case == "alps"
    assert_pruned_alike(one["weights"], ranks[0]["weights"], 0.95 if admm else 0.99, 0.3 if admm else 0.05)
    assert ranks[0]["summary"]["nsamples"] == one["summary"]["nsamples"] == nccl_worker.WINDOWS
    assert ranks[0]["summary"]["overall_sparsity"] == pytest.approx(one["summary"]["overall_sparsity"], abs=0.01)
