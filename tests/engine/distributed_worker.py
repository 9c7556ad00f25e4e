"""One rank of the multi-rank tests in test_distributed.py (not a test module itself).

    python distributed_worker.py OUT SCENARIO

with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set (as torchrun sets them). Scenarios:

* ``cases``: prune a tiny random model once per entry of ``CASES``; every rank saves its pruned
  decoder weights and report summary as OUT/<case>.rank<r>.pt. Then one rank raises inside pruning
  (a UserError, then a RuntimeError) and every rank records what it saw in OUT/errors.rank<r>.json.
* ``hang``: rank 1 stops answering (sleeps past the timeout); rank 0 prunes and records what it saw.
* ``streamed``: prune the checkpoint OUT/src streamed from disk (``d2prune.streaming.prune_checkpoint``, disk
  activations) into OUT/full, evaluate it layer by layer, then prune it into OUT/interrupted, stopped
  after layer 1 (as by Ctrl-C), and try to resume that under torchrun; every rank records what it
  saw in OUT/streamed.rank<r>.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import d2prune  # noqa: E402
from conftest import build_tiny_model, make_calibration_ids, tiny_gpt2  # noqa: E402
from d2prune.engine import distributed  # noqa: E402
from d2prune.engine.architecture import find_decoder_stack, find_linears  # noqa: E402
from d2prune.methods.base import LinearPruner, MethodConfig  # noqa: E402

WINDOWS, TOKENS = 7, 32  # 7 windows: the two ranks get 3 and 4 (an uneven split)
TIMEOUT_S = 30.0
HANG_TIMEOUT_S = 3.0

# name -> PruneConfig keyword arguments (progress off everywhere).
CASES: dict[str, dict] = {
    "sparsegpt": dict(method="sparsegpt", sparsity=0.5),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "wanda": dict(method="wanda", sparsity=0.5),
    "magnitude": dict(method="magnitude", sparsity=0.6),
    "d2prune": dict(method=lambda: d2prune.D2PruneConfig(target_layers=["self_attn.k_proj"], r2=0.1), sparsity=0.5),
    "d2prune-reference": dict(
        method=lambda: d2prune.D2PruneConfig(target_layers=["self_attn.k_proj"], stats_mode="reference", s=20.0),
        sparsity=0.5,
    ),
    "d2prune-batch2": dict(method=lambda: d2prune.D2PruneConfig(target_layers=["self_attn.v_proj"]), batch_size=2),
    "pruner-zero": dict(method="pruner-zero", sparsity=0.5),
    "alps": dict(method="alps", sparsity=0.6),
    "d2alps-2:4": dict(method=lambda: d2prune.D2ALPSConfig(target_layers=["self_attn.v_proj"]), pattern="2:4"),
    "ria": dict(method="ria", sparsity=0.5),
    "ria-2:4-permute": dict(method=lambda: d2prune.RIAConfig(permute=True), pattern="2:4"),
    "owl-wanda": dict(method="wanda", sparsity=0.5, sparsity_profile="owl", owl_lambda=0.1, owl_m=3.0),
    "dsnot": dict(method=lambda: d2prune.DSnoTConfig(base="wanda", skip=["self_attn.q_proj"]), sparsity=0.6),
    "wanda-refit": dict(method="wanda", sparsity=0.5, refit="cg"),
    "d2prune-refit": dict(method=lambda: d2prune.D2PruneConfig(target_layers=["self_attn.k_proj"]), refit="cg"),
    # GPT-2's Conv1D linears (weight stored (in, out)): the pruned weights are broadcast as stored.
    "gpt2-sparsegpt-2:4": dict(model="gpt2", method="sparsegpt", pattern="2:4"),
    "gpt2-ria-2:4-permute": dict(model="gpt2", method=lambda: d2prune.RIAConfig(permute=True), pattern="2:4"),
}


def prune_case(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune a fresh tiny model with case ``name``; its decoder linear weights and report summary."""
    options = dict(CASES[name])
    if callable(options["method"]):
        options["method"] = options["method"]()
    model = tiny_gpt2() if options.pop("model", None) == "gpt2" else build_tiny_model("llama-gqa", seed=0)
    report = d2prune.prune(model, make_calibration_ids(WINDOWS, TOKENS), d2prune.PruneConfig(progress=False, **options))
    stack = find_decoder_stack(model)
    weights = {
        f"{i}.{n}": lin.weight.detach().clone()
        for i, layer in enumerate(stack.layers)
        for n, lin in find_linears(layer).items()
    }
    summary = {
        "nsamples": report.nsamples,
        "overall_sparsity": report.overall_sparsity,
        "outlier_ratios": report.outlier_ratios,
        "layer_sparsities": report.layer_sparsities,
        "relative_errors": [lin.relative_error for lin in report.linears],
        "errors_before_refit": [lin.relative_error_before_refit for lin in report.linears],
    }
    return weights, summary


@dataclass
class _FailingConfig(MethodConfig):
    """Magnitude pruning that raises on rank ``rank`` (a UserError or a RuntimeError)."""

    name = "failing"
    rank: int = 1
    user_error: bool = True

    def make_pruner(self, name: str, weight: torch.Tensor, path: str = "") -> LinearPruner:
        return _FailingPruner(name, weight, self)


class _FailingPruner(LinearPruner):
    def __init__(self, name: str, weight: torch.Tensor, config: _FailingConfig):
        super().__init__(name, weight)
        self.config = config

    def prune(self, weight, target, gram):
        if distributed.current().rank == self.config.rank:
            raise (d2prune.UserError if self.config.user_error else RuntimeError)(f"no luck with {self.name}")
        return weight.float().clone()


STREAMED_LAYERS = 4


def streamed_config() -> d2prune.PruneConfig:
    return d2prune.PruneConfig(method="sparsegpt", batch_size=2, activation_offload="disk", progress=False)


class _Stop(KeyboardInterrupt):
    """Like Ctrl-C between two layers."""


def streamed(out: Path, rank: int) -> dict:
    import d2prune.streaming as offload

    ids = make_calibration_ids(WINDOWS, TOKENS)
    seen: dict = {}
    original = offload.StreamedStore.layer_done

    def layer_done(self, index, report, acts):
        original(self, index, report, acts)
        if index == 0 and rank == 0:  # every rank has its activation files by now
            seen["work_files"] = sorted(p.name for p in self.work.iterdir())
        if self.target.name == "interrupted" and index == 1:
            raise _Stop

    offload.StreamedStore.layer_done = layer_done
    report, target = offload.prune_checkpoint(out / "src", ids, streamed_config(), out / "full")
    seen["nsamples"], seen["overall_sparsity"] = report.nsamples, report.overall_sparsity
    tokens = make_calibration_ids(3, TOKENS, seed=5).reshape(-1)
    seen["nll_per_window"] = offload.evaluate_streamed(target, tokens, TOKENS, progress=False).nll_per_window
    try:
        offload.prune_checkpoint(out / "src", ids, streamed_config(), out / "interrupted")
    except _Stop:
        seen["interrupted"] = True
    seen["resume"] = _outcome(
        lambda: offload.prune_checkpoint(out / "src", ids, streamed_config(), out / "interrupted", resume=True)
    )
    return seen


def _outcome(run) -> dict:
    t0 = time.perf_counter()
    try:
        run()
    except Exception as exc:  # what each rank sees is the point of the test
        return {"type": type(exc).__name__, "message": str(exc), "seconds": time.perf_counter() - t0}
    return {"type": None, "message": None, "seconds": time.perf_counter() - t0}


def _wait_for_all_ranks(out: Path, rank: int, size: int) -> None:
    """Start the process group only once every rank has started up, so that a short timeout
    measures silence between ranks, not uneven interpreter start-up on a busy machine."""
    (out / f"ready.rank{rank}").touch()
    deadline = time.monotonic() + 120
    while not all((out / f"ready.rank{r}").exists() for r in range(size)):
        if time.monotonic() > deadline:
            raise SystemExit("the other ranks never started")
        time.sleep(0.01)


def main(out: Path, scenario: str) -> None:
    torch.set_num_threads(1)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = build_tiny_model("llama-gqa", seed=0)  # imports transformers' model code before the handshake
    _wait_for_all_ranks(out, rank, size)
    world, _ = distributed.init_from_env("cpu", HANG_TIMEOUT_S if scenario == "hang" else TIMEOUT_S)
    if scenario == "cases":
        for name in CASES:
            weights, summary = prune_case(name)
            torch.save({"weights": weights, "summary": summary}, out / f"{name}.rank{world.rank}.pt")
        seen = {}
        for label, user_error in (("user_error", True), ("runtime_error", False)):
            config = d2prune.PruneConfig(method=_FailingConfig(user_error=user_error), progress=False)
            model = build_tiny_model("llama-gqa", seed=0)
            seen[label] = _outcome(lambda m=model, c=config: d2prune.prune(m, make_calibration_ids(WINDOWS, TOKENS), c))
        (out / f"errors.rank{world.rank}.json").write_text(json.dumps(seen))
    elif scenario == "hang":
        if world.rank == 1:
            time.sleep(HANG_TIMEOUT_S + 8)  # alive but silent, past rank 0's timeout
            return
        seen = _outcome(
            lambda: d2prune.prune(model, make_calibration_ids(WINDOWS, TOKENS), d2prune.PruneConfig(progress=False))
        )
        (out / f"hang.rank{world.rank}.json").write_text(json.dumps(seen))
    elif scenario == "streamed":
        (out / f"streamed.rank{world.rank}.json").write_text(json.dumps(streamed(out, world.rank)))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    if scenario == "hang":  # rank 0 leaves as the CLI does after a failed peer (0: its record is the result)
        distributed.exit_after_failure(0)
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
