"""Activation buffers in RAM or in memory-mapped files (activations.py), and their use by the pipeline."""

from __future__ import annotations

import pytest
import torch

import d2prune
from conftest import build_tiny_model, make_calibration_ids
from d2prune.engine.activations import Activations


def _config(method="sparsegpt", **kw) -> d2prune.PruneConfig:
    return d2prune.PruneConfig(method=method, progress=False, batch_size=2, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disk_activations_round_trip_and_are_deleted(tmp_path, dtype):
    acts = Activations("disk", torch.device("cpu"), tmp_path / "acts")
    acts.allocate((3, 4, 5), dtype)
    values = torch.randn(3, 4, 5).to(dtype)
    acts.inps[:] = values
    acts.swap()
    assert torch.equal(acts.outs, values)
    acts.flush()
    info = acts.describe()
    assert info["storage"] == "disk" and info["bytes"] == 2 * 60 * dtype.itemsize
    assert info["dtype"] == str(dtype).removeprefix("torch.")
    again = Activations("disk", torch.device("cpu"), tmp_path / "acts")
    assert again.reopen((3, 4, 5), dtype, current=acts.current)
    assert torch.equal(again.outs, values)
    assert not Activations("disk", torch.device("cpu"), tmp_path / "acts").reopen((3, 4, 6), dtype, 0)
    acts.close(delete=True)
    assert not (tmp_path / "acts").exists()


def test_ranks_share_a_folder_with_their_own_files(tmp_path):
    """Under torchrun each rank maps its own pair of files (its share of the windows) in one folder."""
    ranks = [Activations("disk", torch.device("cpu"), tmp_path / "acts", rank=r) for r in range(2)]
    for r, acts in enumerate(ranks):
        acts.allocate((2 + r, 4, 5), torch.float32)
        acts.inps[:] = r
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == [
        "activations-0.rank0.bin",
        "activations-0.rank1.bin",
        "activations-1.rank0.bin",
        "activations-1.rank1.bin",
    ]
    ranks[0].close(delete=True)
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == [
        "activations-0.rank1.bin",
        "activations-1.rank1.bin",
    ]
    assert torch.equal(ranks[1].inps, torch.ones(3, 4, 5))
    # One process (rank None) never takes a rank's files for its own.
    assert not Activations("disk", torch.device("cpu"), tmp_path / "acts").reopen((3, 4, 5), torch.float32, 0)
    ranks[1].close(delete=True)
    assert not (tmp_path / "acts").exists()


def test_activation_storage_is_chosen_by_size(monkeypatch):
    monkeypatch.setattr("d2prune.engine.activations.available_memory", lambda: 1000)
    small, big = Activations("auto", torch.device("cpu")), Activations("auto", torch.device("cpu"))
    small.allocate((2, 10), torch.float32)  # 160 bytes <= 500
    big.allocate((2, 100), torch.float32)  # 1600 bytes > 500
    assert (small.storage, big.storage) == ("ram", "disk")
    folder = big.folder
    big.close()
    assert not folder.exists()


def test_in_memory_pruning_with_disk_activations_is_identical(tmp_path):
    ids = make_calibration_ids(windows=6, tokens=16)
    ram_model, disk_model = build_tiny_model("mistral"), build_tiny_model("mistral")
    ram = d2prune.prune(ram_model, ids, _config(activation_offload="ram"))
    disk = d2prune.prune(disk_model, ids, _config(activation_offload="disk", activation_dir=str(tmp_path / "a")))
    for a, b in zip(ram_model.state_dict().values(), disk_model.state_dict().values()):
        assert torch.equal(a, b)
    assert ram.activations["storage"] == "ram" and disk.activations["storage"] == "disk"
    assert disk.activations["bytes"] == ram.activations["bytes"] == 2 * 6 * 16 * 64 * 4
    assert not (tmp_path / "a").exists()  # deleted at the end
