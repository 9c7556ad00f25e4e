"""io.integrity: the header checks agree with safetensors' own reader, and a sound folder passes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from conftest import build_tiny_model
from d2prune.errors import UserError
from d2prune.io.integrity import check_model_folder, safetensors_header


def _safe_open_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                fh.get_tensor(name)
    except (SafetensorError, OSError, OverflowError, ValueError):
        return False
    return True


def test_header_check_agrees_with_safetensors_on_every_cut_and_flipped_header_byte(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    good = tmp_path / "good.safetensors"
    save_file(tensors, good, metadata={"format": "pt"})
    data = good.read_bytes()
    assert set(safetensors_header(good)) == set(tensors)
    header_end = 8 + int.from_bytes(data[:8], "little")
    damaged = tmp_path / "damaged.safetensors"
    variants = [data[:cut] for cut in range(0, len(data), 7)]
    variants += [data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :] for i in range(0, header_end, 3)]
    for variant in variants:
        damaged.write_bytes(variant)
        accepted = _safe_open_accepts(damaged)
        try:
            safetensors_header(damaged)
            ours = True
        except UserError as exc:
            assert str(damaged) in str(exc)
            ours = False
        # A flipped byte inside a JSON string (a tensor name) still parses for both.
        assert ours == accepted, (len(variant), variant[:40])


def test_sound_sharded_folder_passes_and_a_stale_index_is_named(tmp_path):
    model = build_tiny_model("llama-gqa")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    check_model_folder(tmp_path)
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    other = next(f for f in set(data["weight_map"].values()) if f != data["weight_map"][name])
    data["weight_map"][name] = other
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match=f"places {name} in {other}, which does not hold it"):
        check_model_folder(tmp_path)
