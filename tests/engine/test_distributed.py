"""Data-parallel calibration on torch.distributed (gloo on CPU): 1 vs 2 ranks give the same pruning,
and a failing or silent rank ends every rank with a clear error instead of a hang.

Tolerance (docs/distributed.md#agreement): masks identical; each pruned linear's weights within
1e-5 relative (‖ΔW‖ ≤ 1e-5·‖W‖, in the max and the Frobenius norm). Float32 sums that ranks add up in
another order (Grams, Pruner-Zero's squared gradients) differ by reassociation only; per-element
relative differences of OBS-updated weights near zero are larger and not meaningful. Statistics
summed in float64 (Wanda's and D²Prune's norms) make the row-wise methods bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import d2prune
from conftest import SHARED, make_calibration_ids
from d2prune.engine import distributed, executor
from d2prune.methods import D2PruneConfig, DSnoTConfig, Gram, WandaConfig
from d2prune.methods.base import LinearPruner

HERE = Path(__file__).resolve().parent
WORKER = HERE / "distributed_worker.py"
sys.path.insert(0, str(HERE))
import distributed_worker  # noqa: E402

TINY = SHARED / "models" / "aidreams260K"
DATA = SHARED / "data"
RTOL = 1e-5
# Methods without a weight update: identical masks mean identical weights.
EXACT = {"wanda", "magnitude", "owl-wanda", "pruner-zero", "dsnot", "ria", "ria-2:4-permute", "gpt2-ria-2:4-permute"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, size: int, port: int, **extra: str) -> dict[str, str]:
    """What torchrun gives each rank, plus one thread (the machine has two cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def _spawn(args_per_rank: list[list[str]], env_per_rank: list[dict] | None = None) -> list[subprocess.Popen]:
    port = _free_port()
    size = len(args_per_rank)
    return [
        subprocess.Popen(
            args,
            env=_rank_env(r, size, port, **((env_per_rank or [{}] * size)[r])),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, args in enumerate(args_per_rank)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _assert_same_pruning(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], exact: bool) -> None:
    assert one.keys() == two.keys()
    for name, w in one.items():
        other = two[name]
        assert torch.equal(w == 0, other == 0), f"{name}: masks differ"
        if exact:
            assert torch.equal(w, other), name
        delta = (w - other).double()
        assert delta.abs().max() <= RTOL * w.abs().max(), name
        assert delta.norm() <= RTOL * w.double().norm(), name


# --------------------------------------------------------------------------------------------------
# pieces, in one process
# --------------------------------------------------------------------------------------------------


def test_a_single_process_is_the_default_and_starts_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world, device = distributed.init_from_env("cpu")
    assert world == distributed.World() and world.size == 1 and device == "cpu"
    assert distributed.current().size == 1
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    assert world.shard([1, 2, 3]) == ([1, 2, 3], 0)


def test_shards_are_contiguous_and_cover_everything_once():
    items = list(range(7))
    shards = [distributed.World(rank=r, size=3).shard(items) for r in range(3)]
    assert [s for s, _ in shards] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [lo for _, lo in shards] == [0, 2, 4]
    with pytest.raises(d2prune.UserError, match="2 calibration batches cannot be shared by 3 ranks"):
        distributed.World(rank=0, size=3).shard([0, 1])
    assert distributed.World(rank=2, size=3).shard([0, 1], allow_empty=True) == ([1], 1)


def test_linears_are_assigned_largest_first_to_the_least_loaded_rank():
    # LLaMA-7B-like work (rows·cols² for OBS methods): down ≫ gate = up ≫ q = o ≫ k = v.
    work = {"q": 69, "k": 17, "v": 17, "o": 69, "gate": 185, "up": 185, "down": 496}
    owners = executor.assign(work, 2)
    assert owners["down"] == 0 and owners["gate"] == owners["up"] == 1
    load = [sum(w for n, w in work.items() if owners[n] == r) for r in range(2)]
    assert abs(load[0] - load[1]) <= max(work.values()) and sum(load) == sum(work.values())
    assert executor.assign(work, 1) == dict.fromkeys(work, 0)


def _observations(cols=12, rows=5, batches=(1, 2, 1, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    xs = [torch.randn(b, 9, cols, generator=g) * (1 + torch.rand(cols, generator=g)) for b in batches]
    return w, xs, [x @ w.t() for x in xs]


@pytest.mark.parametrize(
    "make",
    [
        lambda: WandaConfig(),
        lambda: D2PruneConfig(target_layers=["fc"], s=3.0),
        lambda: D2PruneConfig(target_layers=[], s=3.0),
        lambda: D2PruneConfig(target_layers=["fc"], s=3.0, stats_mode="reference"),
        lambda: D2PruneConfig(target_layers=[], s=3.0, stats_mode="reference"),
        lambda: DSnoTConfig(base=D2PruneConfig(target_layers=["fc"], s=3.0, stats_mode="reference"), skip=[]),
    ],
    ids=["wanda", "d2-no-update", "d2-update", "d2-no-update-reference", "d2-update-reference", "dsnot-d2-reference"],
)
def test_statistics_summed_over_shards_equal_one_process(make):
    """What the pipeline does across ranks, by hand: shards observe, their sums are added, loaded."""
    w, xs, ys = _observations()
    whole = make().make_pruner("fc", w)
    whole.begin(0)
    for x, y in zip(xs, ys):
        whole.observe(x, y)
    shards, first = [], 0
    for part in ([0], [1, 2], [3]):  # windows 0 | 1-3 | 4-6
        p = make().make_pruner("fc", w)
        p.begin(first)
        for i in part:
            p.observe(xs[i], ys[i])
            first += xs[i].shape[0]
        shards.append(p.statistics())
    summed = {k: sum(s[k] for s in shards) for k in shards[0]}
    merged = make().make_pruner("fc", w)
    merged.load_statistics(summed)
    for key in whole.statistics():
        torch.testing.assert_close(merged.statistics()[key], whole.statistics()[key], rtol=1e-6, atol=0)
    for attr in ("stats", "sq_norm", "norms"):
        if hasattr(whole, attr):
            stat, other = getattr(whole, attr), getattr(merged, attr)
            for field in ("sq_norm", "y", "dx"):
                if hasattr(stat, field):
                    torch.testing.assert_close(getattr(other, field), getattr(stat, field), rtol=1e-6, atol=0)


def test_gram_statistics_round_trip():
    _, xs, _ = _observations()
    whole, halves = Gram(12, "cpu"), [Gram(12, "cpu"), Gram(12, "cpu")]
    for i, x in enumerate(xs):
        whole.add(x)
        halves[i // 2].add(x)
    merged = Gram(12, "cpu")
    merged.load_statistics({k: halves[0].statistics()[k] + halves[1].statistics()[k] for k in ("sum", "nsamples")})
    assert merged.nsamples == whole.nsamples == 7
    torch.testing.assert_close(merged.hessian(), whole.hessian(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("measure_error", [False, True])
def test_each_gram_is_summed_over_ranks_once_before_it_is_used(monkeypatch, measure_error):
    """The pipeline sums every Gram once per layer, shared ones (q/k/v, gate/up) included, and before
    any Hessian is made from it (the last reader's in place); here rank 0 of 2, the sums recorded."""
    import contextlib

    from conftest import build_tiny_model
    from d2prune.engine import layer as engine_layer

    reduced: list[torch.Tensor] = []

    class RankZeroOfTwo(distributed.World):
        @contextlib.contextmanager
        def sync(self, what):
            yield

        def barrier(self, what):
            pass

        def check_same(self, signature, what):
            pass

        def broadcast_(self, tensor, src, what):
            pass

        def all_reduce_sum(self, tensors, what):
            reduced.extend(tensors)
            destinations.extend([None] * len(tensors))

        def reduce_sum(self, tensors, dst, what):
            reduced.extend(tensors)
            destinations.extend([dst] * len(tensors))

    destinations: list[int | None] = []
    monkeypatch.setattr(distributed, "current", lambda: RankZeroOfTwo(rank=0, size=2))
    made: list[bool] = []
    for cls in (Gram, engine_layer._LastUseGram):

        def hessian(self, original=cls.hessian):
            made.append(any(t is self.sum for t in reduced))  # already summed over the ranks?
            return original(self)

        monkeypatch.setattr(cls, "hessian", hessian)
    model = build_tiny_model("llama-gqa")
    d2prune.prune(
        model,
        make_calibration_ids(4, 16),
        d2prune.PruneConfig(method="sparsegpt", batch_size=2, measure_error=measure_error, progress=False),
    )
    grams = [t for t in reduced if t.dim() == 2 and t.shape[0] == t.shape[1]]
    layers = model.config.num_hidden_layers
    assert len(grams) == 4 * layers  # q/k/v, o, gate/up, down: one Gram each
    assert len({id(t) for t in grams}) == len(grams)  # none summed twice
    owners = executor.assign({n: p.work() for n, p in _sparsegpt_pruners(model).items()}, 2)
    # One Hessian per Gram that rank 0's linears read (linears sharing a Gram share its factor).
    inputs = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate/up", "up_proj": "gate/up"}
    owned = len({inputs.get(n.rsplit(".", 1)[-1], n) for n, owner in owners.items() if owner == 0})
    assert made and all(made) and len(made) == owned * layers  # rank 0's Grams only
    # A Gram whose readers are all on one rank goes to that rank only (reduce, not all-reduce).
    gram_destinations = [d for t, d in zip(reduced, destinations) if t.dim() == 2 and t.shape[0] == t.shape[1]]
    assert {0, 1} <= set(gram_destinations)


def _sparsegpt_pruners(model) -> dict[str, LinearPruner]:
    from d2prune.engine.architecture import find_decoder_stack, find_linears

    layer = find_decoder_stack(model).layers[0]
    config = d2prune.methods.method_config("sparsegpt")
    return {name: config.make_pruner(name, lin.weight) for name, lin in find_linears(layer).items()}


def test_a_pruner_that_observes_without_statistics_cannot_be_summed():
    class Private(LinearPruner):
        def observe(self, x, y):
            self.seen = True

    p = Private("fc", torch.zeros(2, 3))
    with pytest.raises(NotImplementedError, match="statistics"):
        p.statistics()
    assert LinearPruner("fc", torch.zeros(2, 3)).statistics() == {}  # observes nothing: nothing to sum


# --------------------------------------------------------------------------------------------------
# two gloo ranks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Every case of distributed_worker.CASES pruned by 2 ranks, then the error scenarios."""
    out = tmp_path_factory.mktemp("two_ranks")
    results = _finish(_spawn([[sys.executable, str(WORKER), str(out), "cases"]] * 2))
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank}:\n{err}"
    return out


@pytest.mark.parametrize("case", list(distributed_worker.CASES))
def test_two_ranks_prune_like_one_process(two_ranks, case):
    weights, summary = distributed_worker.prune_case(case)
    ranks = [torch.load(two_ranks / f"{case}.rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:  # every rank ends with the same weights
        _assert_same_pruning(ranks[0]["weights"], r["weights"], exact=True)
    _assert_same_pruning(weights, ranks[0]["weights"], exact=case in EXACT)
    two = ranks[0]["summary"]
    assert two["nsamples"] == summary["nsamples"] == distributed_worker.WINDOWS
    assert two["overall_sparsity"] == summary["overall_sparsity"]
    assert two["layer_sparsities"] == pytest.approx(summary["layer_sparsities"], rel=1e-9)
    if case.startswith("owl"):
        assert two["outlier_ratios"] == summary["outlier_ratios"]
    assert two["relative_errors"] == pytest.approx(summary["relative_errors"], rel=1e-4, abs=1e-9)
    before = summary["errors_before_refit"]
    assert [e is None for e in two["errors_before_refit"]] == [e is None for e in before]
    assert any(e is not None for e in before) == case.endswith("refit")
    assert [e for e in two["errors_before_refit"] if e is not None] == pytest.approx(
        [e for e in before if e is not None], rel=1e-4, abs=1e-9
    )


def test_an_error_on_one_rank_is_raised_on_every_rank(two_ranks):
    seen = [json.loads((two_ranks / f"errors.rank{r}.json").read_text()) for r in range(2)]
    # A UserError on rank 1: the same one-line error on both ranks.
    for r in range(2):
        assert seen[r]["user_error"]["type"] == "UserError"
        assert seen[r]["user_error"]["message"].startswith("rank 1: no luck with ")
    # A bug on rank 1: rank 1 keeps its own exception; rank 0 says which rank failed, and how.
    assert seen[1]["runtime_error"]["type"] == "RuntimeError"
    assert seen[0]["runtime_error"]["type"] == "PeerError"
    assert "rank 1 failed while pruning layer 0: RuntimeError: no luck with" in seen[0]["runtime_error"]["message"]


def test_a_silent_rank_ends_the_others_at_the_timeout(tmp_path):
    procs = _spawn([[sys.executable, str(WORKER), str(tmp_path), "hang"]] * 2)
    try:
        rc, _, err = _finish(procs[:1], timeout=120)[0]
    finally:
        procs[1].kill()  # still asleep: it stands for a rank that hangs
        procs[1].communicate()
    assert rc == 0, err
    seen = json.loads((tmp_path / "hang.rank0.json").read_text())
    assert seen["type"] == "PeerError"
    assert f"did not answer within {distributed_worker.HANG_TIMEOUT_S:g} s" in seen["message"]
    assert "Timed out" in seen["message"]
    assert seen["seconds"] < distributed_worker.HANG_TIMEOUT_S + 5


# --------------------------------------------------------------------------------------------------
# two gloo ranks streaming the model from disk (--offload disk)
# --------------------------------------------------------------------------------------------------


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _pruned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if "layers" in k and k.endswith("proj.weight")}


@pytest.fixture(scope="module")
def streamed_two_ranks(tmp_path_factory) -> Path:
    """distributed_worker's ``streamed`` scenario on 2 ranks, and the same model pruned by one process."""
    from d2prune.streaming import prune_checkpoint

    out = tmp_path_factory.mktemp("streamed")
    distributed_worker.build_tiny_model(
        "llama-gqa", seed=0, num_hidden_layers=distributed_worker.STREAMED_LAYERS
    ).save_pretrained(out / "src")
    results = _finish(_spawn([[sys.executable, str(WORKER), str(out), "streamed"]] * 2))
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"rank {rank}:\n{err}"
    ids = make_calibration_ids(distributed_worker.WINDOWS, distributed_worker.TOKENS)
    prune_checkpoint(out / "src", ids, distributed_worker.streamed_config(), out / "one")
    return out


def test_two_ranks_stream_from_disk_like_one_process_and_only_rank_0_writes(streamed_two_ranks):
    from d2prune.engine.activations import PATTERN
    from d2prune.streaming import evaluate_streamed

    out = streamed_two_ranks
    seen = [json.loads((out / f"streamed.rank{r}.json").read_text()) for r in range(2)]
    one, two = _shards(out / "one"), _shards(out / "full")
    assert sorted(one) == sorted(two) and len(_pruned(one)) == 7 * distributed_worker.STREAMED_LAYERS
    _assert_same_pruning(_pruned(one), _pruned(two), exact=False)
    for name in set(one) - set(_pruned(one)):  # embeddings, norms: as read
        assert torch.equal(one[name], two[name]), name
    assert seen[0]["nsamples"] == seen[1]["nsamples"] == distributed_worker.WINDOWS
    assert seen[0]["overall_sparsity"] == seen[1]["overall_sparsity"] == 0.5
    # During the run each rank had its own activation files in the work folder; rank 0 alone wrote
    # the shards and the progress record. The output holds none of the activation files.
    layer0 = json.loads((out / "full" / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.self_attn.q_proj.weight"
    ]
    assert seen[0]["work_files"] == sorted(
        [
            "activations-0.rank0.bin",
            "activations-0.rank1.bin",
            "activations-1.rank0.bin",
            "activations-1.rank1.bin",
            layer0,
            "progress.json",
        ]
    )
    assert "work_files" not in seen[1]
    assert not list((out / "full").glob(PATTERN)) and not (out / ".full.partial").exists()
    # Perplexity layer by layer with the windows split over the ranks: the one-process numbers.
    tokens = make_calibration_ids(3, distributed_worker.TOKENS, seed=5).reshape(-1)
    expected = evaluate_streamed(out / "full", tokens, distributed_worker.TOKENS, progress=False).nll_per_window
    for r in range(2):
        assert seen[r]["nll_per_window"] == pytest.approx(expected, rel=1e-6)


def test_resume_is_refused_under_torchrun_and_one_process_continues_the_run(streamed_two_ranks, capsys):
    from d2prune.engine.activations import PATTERN
    from d2prune.streaming import prune_checkpoint, read_progress

    out = streamed_two_ranks
    seen = [json.loads((out / f"streamed.rank{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        assert seen[r]["interrupted"]
        assert seen[r]["resume"]["type"] == "UserError"
        assert seen[r]["resume"]["message"].startswith("--resume cannot run under torchrun")
    progress = read_progress(out / "interrupted")
    assert progress["next_layer"] == 2 and progress["ranks"] == 2
    assert len(list((out / ".interrupted.partial").glob(PATTERN))) == 4  # both ranks' files were kept

    ids = make_calibration_ids(distributed_worker.WINDOWS, distributed_worker.TOKENS)
    capsys.readouterr()
    report, target = prune_checkpoint(
        out / "src", ids, distributed_worker.streamed_config(), out / "interrupted", resume=True
    )
    assert "ran on 2 ranks (torchrun), this one on 1" in capsys.readouterr().err
    assert report.resumed_at_layer == 2 and report.overall_sparsity == 0.5
    assert "resume_forward" in report.timings  # the ranks' activation files are not this process's
    one, resumed = _shards(out / "one"), _shards(target)
    assert sorted(one) == sorted(resumed)
    _assert_same_pruning(_pruned(one), _pruned(resumed), exact=False)
    assert not list(target.glob(PATTERN)) and not (out / ".interrupted.partial").exists()


# --------------------------------------------------------------------------------------------------
# the command line under torchrun
# --------------------------------------------------------------------------------------------------

needs_assets = pytest.mark.skipif(not (TINY.exists() and DATA.exists()), reason="shared assets missing")


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> Path:
    """One token cache for the CLI runs here, so the data is tokenized once."""
    return tmp_path_factory.mktemp("token_cache")


CLI = [
    "prune",
    str(TINY),
    "--method",
    "sparsegpt",
    "--nsamples",
    "4",
    "--seqlen",
    "64",
    "--eval-windows",
    "4",
    "--no-progress",
    "--data-dir",
    str(DATA),
    "--save-model",
]


@needs_assets
def test_torchrun_prune_matches_one_process_and_only_rank_0_writes(tmp_path, token_cache, monkeypatch):
    from safetensors.torch import load_file

    from d2prune.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "D2PRUNE_CACHE": str(token_cache)}
    out2 = tmp_path / "two"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "d2prune",
            *CLI,
            "--output-dir",
            str(out2),
            "--dist-timeout",
            "60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("run record:") == 1  # one table, rank 0's
    monkeypatch.setenv("D2PRUNE_CACHE", str(token_cache))
    out1 = tmp_path / "one"
    assert main([*CLI, "--output-dir", str(out1)]) == 0

    assert sorted(p.name for p in out2.iterdir()) == ["model", "run.json"]
    one, two = (load_file(str(o / "model" / "model.safetensors")) for o in (out1, out2))
    pruned = {k: v for k, v in one.items() if "layers" in k and k.endswith("proj.weight")}
    assert len(pruned) == 4 * 7
    _assert_same_pruning(pruned, {k: two[k] for k in pruned}, exact=False)
    rec1, rec2 = (json.loads((o / "run.json").read_text()) for o in (out1, out2))
    assert rec2["nsamples"] == rec1["nsamples"] == 4
    assert rec2["overall_sparsity"] == rec1["overall_sparsity"]
    ppl1, ppl2 = (r["perplexity"]["pruned"]["wikitext2"] for r in (rec1, rec2))
    assert ppl2["n_windows"] == ppl1["n_windows"] == 4 and ppl2["ppl"] == pytest.approx(ppl1["ppl"], rel=1e-4)
    dist = rec2["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo" and dist["timeout_s"] == 60
    assert [r["rank"] for r in dist["ranks"]] == [0, 1] and all(r["peak_rss_mb"] > 0 for r in dist["ranks"])
    assert "distributed" not in rec1


@needs_assets
def test_torchrun_streamed_prune_matches_one_process(tmp_path, token_cache, monkeypatch):
    """--offload disk under torchrun: the ranks stream the layers, rank 0 writes the sharded output,
    and the layer-by-layer perplexity is split over the ranks."""
    from d2prune.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "D2PRUNE_CACHE": str(token_cache)}
    out2 = tmp_path / "two"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "d2prune",
            *CLI,
            "--output-dir",
            str(out2),
            "--dist-timeout",
            "60",
            "--offload",
            "disk",
            "--activation-offload",
            "disk",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("run record:") == 1
    monkeypatch.setenv("D2PRUNE_CACHE", str(token_cache))
    out1 = tmp_path / "one"
    assert main([*CLI, "--output-dir", str(out1), "--offload", "none"]) == 0

    assert sorted(p.name for p in out2.iterdir()) == ["model", "run.json"]
    assert (out2 / "model" / "model.safetensors.index.json").is_file()
    one, two = _shards(out1 / "model"), _shards(out2 / "model")
    assert len(_pruned(one)) == 4 * 7
    _assert_same_pruning(_pruned(one), {k: two[k] for k in _pruned(one)}, exact=False)
    rec1, rec2 = (json.loads((o / "run.json").read_text()) for o in (out1, out2))
    assert rec2["offload"]["weights"] == "disk" and rec2["activations"]["storage"] == "disk"
    assert rec2["nsamples"] == 4 and rec2["overall_sparsity"] == rec1["overall_sparsity"]
    ppl1, ppl2 = (r["perplexity"]["pruned"]["wikitext2"] for r in (rec1, rec2))
    assert ppl2["n_windows"] == ppl1["n_windows"] == 4 and ppl2["ppl"] == pytest.approx(ppl1["ppl"], rel=1e-4)
    assert rec2["distributed"]["world_size"] == 2


@needs_assets
def test_a_user_mistake_on_one_rank_is_one_line_on_every_rank(tmp_path, token_cache):
    """Rank 1 alone cannot read the calibration data (its own data folder is missing)."""
    args = [sys.executable, "-m", "d2prune", *CLI, "--output-dir", str(tmp_path / "out"), "--dist-timeout", "60"]
    missing = tmp_path / "no-data"
    args1 = [a if a != str(DATA) else str(missing) for a in args]
    cache = {"D2PRUNE_CACHE": str(token_cache)}
    results = _finish(_spawn([args, args1], [cache, cache]))
    for rank, (rc, _, err) in enumerate(results):
        lines = [line for line in err.splitlines() if line.startswith("d2prune: error")]
        assert rc == 2, f"rank {rank}: {err}"
        assert len(lines) == 1 and lines[0].startswith("d2prune: error: rank 1: ") and str(missing) in lines[0], err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_resume_under_torchrun_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    from d2prune.cli import main

    monkeypatch.setattr(distributed, "current", lambda: distributed.World(rank=0, size=2))
    assert main(["prune", str(tmp_path / "model"), "--resume", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "d2prune: error: --resume cannot run under torchrun: resume the interrupted run in one process "
        "(without torchrun)\n"
    )


def test_one_process_commands_refuse_torchrun(monkeypatch, capsys):
    from d2prune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["finetune", "some-model", "--output-dir", "x"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def test_exit_after_failure_flushes_output_and_exits_with_the_code():
    code = (
        "import sys; from d2prune.engine import distributed; "
        "print('out', end=''); print('err', end='', file=sys.stderr); distributed.exit_after_failure(3)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # pipes buffered, as usual
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out", "err")
