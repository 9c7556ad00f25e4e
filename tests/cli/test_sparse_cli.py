"""``--save-format sparse``, ``d2prune pack`` and ``d2prune unpack`` on the tiny trained LLaMA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import DATA, QUICK_CLI, TINY, needs_assets
from d2prune.cli import main
from d2prune.io import sparse, sparse_load

EVAL = ["--seqlen", "64", "--eval-windows", "4", "--no-progress", "--data-dir", str(DATA)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _bits_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].view(torch.int32), sb[k].view(torch.int32)) for k in sa)


def _ppl(run_json, label):
    return json.loads(run_json.read_text())["perplexity"][label]["wikitext2"]["ppl"]


@needs_assets
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_prune_saves_sparse_and_eval_gives_the_dense_saves_perplexity(tmp_path, cache, offload):
    from transformers import AutoModelForCausalLM

    prune = ["prune", str(TINY), "--method", "wanda", "--pattern", "2:4", "--offload", offload, *QUICK_CLI]
    assert main([*prune, "--output-dir", str(tmp_path / "d"), "--save-model"]) == 0
    assert main([*prune, "--output-dir", str(tmp_path / "s"), "--save-model", "--save-format", "sparse"]) == 0
    dense, packed = tmp_path / "d" / "model", tmp_path / "s" / "model"
    assert sparse.is_sparse_folder(packed) and not list(packed.glob("model*.safetensors.index.json"))
    assert not (tmp_path / "s" / ".model.partial").exists()
    assert _bits_equal(sparse_load.load_pretrained(packed), AutoModelForCausalLM.from_pretrained(dense, dtype="auto"))

    # eval on the sparse folder, in memory and streamed from disk (decoded shard by shard).
    for eval_offload in ("none", "disk"):
        assert main(["eval", str(packed), *EVAL, "--offload", eval_offload, "--output-dir", str(tmp_path / "ev")]) == 0
        assert _ppl(tmp_path / "ev" / "run.json", "model") == _ppl(tmp_path / "s" / "run.json", "pruned")

    # unpack → a folder plain transformers loads, with the same weights.
    assert main(["unpack", str(packed), str(tmp_path / "plain")]) == 0
    assert _bits_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), sparse_load.load_pretrained(packed))


@needs_assets
def test_pack_then_eval_and_finetune_read_the_sparse_folder(tmp_path, cache, capsys):
    prune = ["prune", str(TINY), "--method", "magnitude", "--sparsity", "0.7", *QUICK_CLI]
    assert main([*prune, "--output-dir", str(tmp_path / "d"), "--save-model"]) == 0
    assert main(["pack", str(tmp_path / "d" / "model"), str(tmp_path / "packed")]) == 0
    assert "packed" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "packed"), *EVAL, "--output-dir", str(tmp_path / "ev")]) == 0
    assert _ppl(tmp_path / "ev" / "run.json", "model") == _ppl(tmp_path / "d" / "run.json", "pruned")

    ft = ["finetune", str(tmp_path / "packed"), "--max-steps", "1", "--block-size", "32", "--max-train-samples", "4"]
    ft += ["--data", "c4", *EVAL, "--output-dir", str(tmp_path / "ft"), "--save-format", "sparse"]
    assert main(ft) == 0
    merged = tmp_path / "ft" / "model"
    assert sparse.is_sparse_folder(merged)
    record = json.loads((merged / "sparsity.json").read_text())
    pruned = json.loads((tmp_path / "d" / "run.json").read_text())["overall_sparsity"]
    assert record["overall_sparsity"] == pytest.approx(pruned, abs=1e-9)
    # Fine-tuning kept the mask: the merged sparse model has zeros exactly where the pruned one had them.
    before, after = sparse_load.load_pretrained(tmp_path / "packed"), sparse_load.load_pretrained(merged)
    for name in record["linears"]:
        assert torch.equal(after.get_parameter(name + ".weight") == 0, before.get_parameter(name + ".weight") == 0)


def _cli(tmp_path, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "d2prune", *map(str, args)],
        capture_output=True,
        text=True,
        env={
            "D2PRUNE_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": ":".join(sys.path),
        },
        timeout=300,
    )
    return proc.returncode, proc.stderr


@needs_assets
def test_sparse_command_mistakes_give_one_line_and_exit_2(tmp_path):
    sparse.pack_folder(TINY, tmp_path / "packed")
    (tmp_path / "broken").mkdir()
    for f in (tmp_path / "packed").iterdir():
        (tmp_path / "broken" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "broken" / "model.sparse.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    cases = [
        (["unpack", TINY, tmp_path / "x"], "not a sparse model folder"),
        (["pack", tmp_path / "packed", tmp_path / "x"], "already a sparse folder"),
        (["pack", tmp_path / "nothing", tmp_path / "x"], "not a folder"),
        (["unpack", tmp_path / "broken", tmp_path / "x"], "damaged"),
        (["eval", tmp_path / "broken", *EVAL], "damaged"),
        (["prune", TINY, "--save-format", "csr", *QUICK_CLI], "invalid choice"),
        (["prune", TINY, "--save-format", "sparse", *QUICK_CLI], "add --save-model"),
    ]
    for args, needle in cases:
        rc, err = _cli(tmp_path, *args)
        lines = [line for line in err.splitlines() if line.startswith("d2prune: error")]
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x").exists()


@needs_assets
def test_streaming_from_a_sparse_folder_prunes_like_the_dense_one(tmp_path, cache):
    from transformers import AutoModelForCausalLM

    sparse.pack_folder(TINY, tmp_path / "packed")  # an unpruned model: stored dense, in the sparse format
    args = ["--method", "magnitude", "--offload", "disk", "--eval", "none", *QUICK_CLI]
    assert main(["prune", str(tmp_path / "packed"), *args, "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["prune", str(TINY), *args, "--output-dir", str(tmp_path / "b")]) == 0
    out = tmp_path / "a" / "model"
    assert not sparse.is_sparse_folder(out) and not (out / "README.md").exists()
    a = AutoModelForCausalLM.from_pretrained(out)
    assert _bits_equal(a, AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model"))
