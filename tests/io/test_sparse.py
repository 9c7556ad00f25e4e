"""Sparse folders: the codec against hand-made references, bit-exact round trips (zero signs included)
in every dtype and pattern, sizes, loading, and the failures (transformers alone, damaged files,
interrupted packs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import ARCH_KEYS, build_tiny_model, make_calibration_ids, tiny_gpt2
from d2prune.errors import UserError
from d2prune.io import sparse, sparse_load
from d2prune.io.models import save_pruned
from d2prune.io.sparse_codec import decode, encode

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype]))


def _pruned(rows: int, cols: int, dtype, pattern: str, sparsity: float = 0.5, seed: int = 0) -> torch.Tensor:
    """A magnitude-pruned random weight; N:M = N zeros in each group of M inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    if pattern == "unstructured":
        k = int(cols * sparsity)
        idx = w.float().abs().argsort(1)[:, :k]
        return w.scatter(1, idx, 0.0)
    n, m = map(int, pattern.split(":"))
    groups = w.reshape(-1, m)
    idx = groups.float().abs().argsort(1)[:, :n]
    return groups.scatter(1, idx, 0.0).reshape(rows, cols)


def test_bitmask_layout_against_a_hand_made_reference():
    w = torch.tensor([[0.0, 1.5, 0.0, -0.0], [2.0, 0.0, 0.0, 0.0]])
    parts, entry = encode(torch.cat([w, torch.zeros(2, 60)], 1))
    assert entry["layout"] == "bitmask" and entry["shape"] == [2, 64]
    # Stored: the non-+0.0 bit patterns, -0.0 among them, row-major.
    assert _same_bits(parts["values"], torch.tensor([1.5, -0.0, 2.0]))
    bits = np.unpackbits(parts["mask"].numpy(), bitorder="little")
    assert bits[:4].tolist() == [0, 1, 0, 1] and bits[64:68].tolist() == [1, 0, 0, 0] and bits.sum() == 3


def test_2_4_layout_against_a_hand_made_reference():
    a, b, c = 1.0, -2.0, 3.0
    w = torch.tensor([[0.0, a, 0.0, b, c, 0.0, 0.0, 0.0]] * 4, dtype=torch.bfloat16)
    parts, entry = encode(w, (2, 4))
    assert entry["layout"] == "nm" and (entry["n"], entry["m"]) == (2, 4)
    # Group 1 keeps positions 1 and 3; group 2 has one stored value and pads with its first +0.0.
    assert _same_bits(parts["values"], torch.tensor([a, b, c, 0.0] * 4, dtype=torch.bfloat16))
    # 2-bit little-endian positions 1, 3, 0, 1 → bits 1,0, 1,1, 0,0, 1,0 → 0b01001101.
    assert parts["index"].tolist() == [0b01001101] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "pattern,layout",
    [("unstructured", "bitmask"), ("2:4", "nm"), ("4:8", "bitmask"), ("3:4", "nm"), ("6:8", "nm"), ("1:2", "nm")],
)
def test_round_trip_is_bit_identical(dtype, pattern, layout):
    w = _pruned(16, 64, dtype, pattern)
    w[3] = 0.0  # a row with every weight pruned
    nm = tuple(map(int, pattern.split(":"))) if ":" in pattern else None
    parts, entry = encode(w, nm)
    assert entry["layout"] == layout
    assert _same_bits(decode(entry, parts), w)
    # Signs of zeros: a kept -0.0 and a pruned position holding -0.0 (4:8 and unstructured have room
    # for an extra stored value in every group; 2:4 and 3:4 groups are full, so the codec falls back).
    w[0, 0], w[1, 5] = -0.0, -0.0
    parts, entry = encode(w, nm)
    back = decode(entry, parts)
    assert _same_bits(back, w)
    assert torch.signbit(back[0, 0]) and torch.signbit(back[1, 5])


def test_a_kept_exact_zero_decodes_to_the_same_bits():
    w = _pruned(8, 32, torch.bfloat16, "2:4")
    kept = (w[0] != 0).nonzero()[0, 0]
    w[0, kept] = 0.0  # a weight the pruner kept that a refit made exactly +0.0
    w[1, (w[1] != 0).nonzero()[0, 0]] = -0.0  # and one that became -0.0
    parts, entry = encode(w, (2, 4))
    assert entry["layout"] == "nm"
    assert _same_bits(decode(entry, parts), w)


@pytest.mark.parametrize(
    "pattern,sparsity,limit", [("unstructured", 0.5, 0.57), ("unstructured", 0.7, 0.37), ("2:4", 0.5, 0.57)]
)
def test_bf16_sizes_meet_the_goals(pattern, sparsity, limit):
    w = _pruned(256, 512, torch.bfloat16, pattern, sparsity)
    parts, _ = encode(w, (2, 4) if pattern == "2:4" else None)
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert stored / (w.numel() * 2) <= limit


def test_dense_and_non_float_tensors_stay_dense():
    assert encode(torch.randn(8, 8)) is None  # no zeros: the encoding would be bigger
    assert encode(torch.randn(64)) is None  # 1-D (norms, biases)
    assert encode(torch.zeros(8, 8, dtype=torch.int64)) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.__setitem__("values", p["values"][:-1]),
        lambda p: p.__setitem__("mask", p["mask"][:-1]),
        lambda p: p.__setitem__("values", p["values"].float()),
    ],
)
def test_decode_refuses_parts_that_do_not_fit(damage):
    parts, entry = encode(_pruned(8, 32, torch.bfloat16, "unstructured"))
    damage(parts)
    with pytest.raises(ValueError):
        decode(entry, parts)


def test_nm_decode_refuses_repeated_positions():
    parts, entry = encode(_pruned(4, 8, torch.float16, "2:4"), (2, 4))
    parts["index"] = torch.zeros_like(parts["index"])  # every position 0: duplicates
    with pytest.raises(ValueError, match="out of order"):
        decode(entry, parts)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "3:4", "4:6", "6:8", "2:3"])
def test_decoding_in_steps_matches_across_step_boundaries(monkeypatch, pattern):
    """The decoder works through a tensor in steps; with steps of 64 elements a 13x96 tensor takes
    20 of them, the last one partial."""
    from d2prune.io import sparse_codec

    monkeypatch.setattr(sparse_codec, "_CHUNK", 64)
    w = _pruned(13, 96, torch.bfloat16, pattern)
    w[2, :] = 0.0
    nm = tuple(map(int, pattern.split(":"))) if ":" in pattern else None
    parts, entry = encode(w, nm)
    assert entry["layout"] == ("nm" if nm else "bitmask")
    assert _same_bits(decode(entry, parts), w)


@pytest.mark.parametrize("shape", [(1, 4), (3, 4), (5, 12)])
def test_2_4_with_an_odd_number_of_groups_decodes_its_last_half_byte(shape):
    """2:4 decodes an index byte (two groups) at a time; an odd group count leaves a padding field."""
    w = _pruned(*shape, torch.float32, "2:4")
    parts, entry = encode(w, (2, 4))
    assert entry["layout"] == "nm"
    assert _same_bits(decode(entry, parts), w)


def test_2_4_decode_refuses_positions_in_decreasing_order():
    parts, entry = encode(_pruned(4, 8, torch.bfloat16, "2:4"), (2, 4))
    parts["index"] = torch.full_like(parts["index"], 0b0001_0001)  # positions (1, 0) in every group
    with pytest.raises(ValueError, match="out of order"):
        decode(entry, parts)


def test_decode_refuses_a_mask_that_marks_more_values_than_stored():
    parts, entry = encode(_pruned(8, 32, torch.bfloat16, "unstructured"))
    parts["mask"] = torch.full_like(parts["mask"], 255)
    with pytest.raises(ValueError, match="marks more values"):
        decode(entry, parts)


def test_nm_decode_refuses_a_position_outside_its_group():
    parts, entry = encode(_pruned(4, 6, torch.bfloat16, "2:3"), (2, 3))
    parts["index"] = torch.full_like(parts["index"], 255)  # 2-bit position 3 in groups of 3
    with pytest.raises(ValueError, match="out of range"):
        decode(entry, parts)


# --------------------------------------------------------------------------------------------------
# Folders


def _tiny_pruned(dtype=torch.bfloat16, pattern="unstructured"):
    model = build_tiny_model("llama-gqa").to(dtype)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for j, lin in enumerate(lin for lin in layer.modules() if isinstance(lin, torch.nn.Linear)):
                w = _pruned(*lin.weight.shape, dtype, pattern, seed=10 * i + j)
                w[0, 0] = -0.0 if pattern == "unstructured" else w[0, 0]
                lin.weight.copy_(w)
    return model


def _record(pattern="unstructured"):
    return {"method": "magnitude", "pattern": pattern, "linears": {}}


def _state_bits_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(_same_bits(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_saved_sparse_folder_loads_bit_identical_to_the_dense_save(tmp_path, dtype, pattern):
    from transformers import AutoModelForCausalLM

    model = _tiny_pruned(dtype, pattern)
    save_pruned(model, None, tmp_path / "dense", _record(pattern))
    save_pruned(model, None, tmp_path / "sparse", _record(pattern), save_format="sparse")
    names = {p.name for p in (tmp_path / "sparse").iterdir()}
    assert {"model.sparse.json", "model.sparse.safetensors", "config.json", "sparsity.json", "README.md"} <= names
    assert not any(n in names for n in ("model.safetensors", "model.safetensors.index.json"))
    layouts = {
        e["layout"] for e in json.loads((tmp_path / "sparse" / "model.sparse.json").read_text())["tensors"].values()
    }
    assert layouts == {"dense", "nm" if pattern == "2:4" else "bitmask"}

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype="auto")
    loaded = sparse_load.load_pretrained(tmp_path / "sparse")
    assert _state_bits_equal(loaded, dense) and _state_bits_equal(loaded, model)
    # In another dtype (as load_model asks): the same as loading the dense save so.
    a, _ = sparse_load.load_sparse(tmp_path / "sparse", "float32", tokenizer=False)
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert _state_bits_equal(a, b)
    assert (tmp_path / "sparse" / "model.sparse.safetensors").stat().st_size < 0.75 * (
        tmp_path / "dense" / "model.safetensors"
    ).stat().st_size

    # Plain transformers refuses the folder instead of random-initializing the pruned linears.
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert "d2prune unpack" in (tmp_path / "sparse" / "README.md").read_text()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCH_KEYS)
def test_every_architecture_loads_as_from_pretrained_would(tmp_path, arch, tied, monkeypatch):
    """The quick build (decoded tensors assigned as the weights) gives what ``from_pretrained`` gives
    from the dense save: weights, buffers (rotary tables), tying; where it does not apply it steps aside."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(arch, tie_word_embeddings=tied).to(torch.bfloat16)
    with torch.no_grad():
        for lin in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.copy_(_pruned(*lin.weight.shape, torch.bfloat16, "unstructured"))
    save_pruned(model, None, tmp_path / "dense", _record())
    save_pruned(model, None, tmp_path / "sparse", _record(), save_format="sparse")
    quick = []
    real = sparse_load._assigned
    monkeypatch.setattr(sparse_load, "_assigned", lambda *a: quick.append(real(*a)) or quick[-1])
    loaded, _ = sparse_load.load_sparse(tmp_path / "sparse", "float32", tokenizer=False)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert _state_bits_equal(loaded, dense)
    buffers = dict(dense.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in loaded.named_buffers())
    assert dict(loaded.named_buffers()).keys() == buffers.keys()
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
    assert not loaded.training and loaded.config.dtype == torch.float32
    if arch == "llama-gqa":
        assert quick[0] is not None  # the common case takes the quick build


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_gpt2_conv1d_weights_round_trip(tmp_path, pattern):
    """GPT-2 stores its linears transposed (Conv1D, (in, out)): the sparse folder still loads bit for
    bit and is smaller. Its N:M groups run down the stored columns, so they take the bitmask layout
    (for 2:4 as small as the nm layout: one bit per weight either way)."""
    from transformers import AutoModelForCausalLM

    import d2prune

    model = tiny_gpt2(dtype=torch.bfloat16)
    target = {"pattern": pattern} if ":" in pattern else {"sparsity": 0.5}
    ids = make_calibration_ids(windows=4, tokens=16)
    d2prune.prune(model, ids, d2prune.PruneConfig(method="magnitude", progress=False, **target))
    save_pruned(model, None, tmp_path / "dense", _record(pattern))
    save_pruned(model, None, tmp_path / "sparse", _record(pattern), save_format="sparse")
    entries = json.loads((tmp_path / "sparse" / "model.sparse.json").read_text())["tensors"]
    conv = {k: e["layout"] for k, e in entries.items() if k.endswith(("c_attn.weight", "c_fc.weight"))}
    assert len(conv) == 4 and set(conv.values()) == {"bitmask"}
    loaded = sparse_load.load_pretrained(tmp_path / "sparse")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype="auto")
    assert _state_bits_equal(loaded, dense) and _state_bits_equal(loaded, model)
    assert sparse.folder_bytes(tmp_path / "sparse") < 0.8 * sparse.folder_bytes(tmp_path / "dense")


def test_the_sparse_save_writes_no_dense_shard_first(tmp_path, monkeypatch):
    # Each shard is encoded as save_pretrained hands it over; converting dense files is only a fallback.
    def no_conversion(*args, **kwargs):
        raise AssertionError("dense shards were written and converted")

    monkeypatch.setattr(sparse, "sparsify_folder", no_conversion)
    model = _tiny_pruned(torch.float32)
    save_pruned(model, None, tmp_path / "s", _record(), save_format="sparse")
    assert _state_bits_equal(sparse_load.load_pretrained(tmp_path / "s"), model)
    import transformers.modeling_utils as tm
    from safetensors.torch import save_file

    assert tm.safe_save_file is save_file  # put back


def test_pack_and_unpack_give_back_the_dense_files_byte_for_byte(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_pruned()
    save_pruned(model, None, tmp_path / "dense", _record())
    sparse.pack_folder(tmp_path / "dense", tmp_path / "packed")
    sparse.unpack_folder(tmp_path / "packed", tmp_path / "unpacked")
    for name in ("model.safetensors", "config.json", "sparsity.json", "generation_config.json"):
        assert (tmp_path / "unpacked" / name).read_bytes() == (tmp_path / "dense" / name).read_bytes(), name
    assert not (tmp_path / "unpacked" / "README.md").exists()
    assert _state_bits_equal(AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked", dtype="auto"), model)


def test_sharded_folders_pack_shard_by_shard(tmp_path):
    model = _tiny_pruned(torch.float32)
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "dense").glob("model-*.safetensors"))
    assert len(shards) > 2
    sparse.pack_folder(tmp_path / "dense", tmp_path / "packed")
    assert sorted(p.name for p in (tmp_path / "packed").glob("*.sparse.safetensors")) == [
        sparse.sparse_name(s) for s in shards
    ]
    sparse.unpack_folder(tmp_path / "packed", tmp_path / "unpacked")
    for name in [*shards, "model.safetensors.index.json"]:
        if name.endswith(".json"):
            assert json.loads((tmp_path / "unpacked" / name).read_text()) == json.loads(
                (tmp_path / "dense" / name).read_text()
            )
        else:
            assert (tmp_path / "unpacked" / name).read_bytes() == (tmp_path / "dense" / name).read_bytes()
    assert _state_bits_equal(sparse_load.load_pretrained(tmp_path / "packed"), model)


def test_pack_of_an_unpruned_folder_stores_it_dense_and_round_trips(tmp_path):
    model = build_tiny_model("llama-gqa")
    model.save_pretrained(tmp_path / "dense")
    sparse.pack_folder(tmp_path / "dense", tmp_path / "packed")
    index = json.loads((tmp_path / "packed" / "model.sparse.json").read_text())
    assert {e["layout"] for e in index["tensors"].values()} == {"dense"}
    assert _state_bits_equal(sparse_load.load_pretrained(tmp_path / "packed"), model)


def test_pack_in_place_replaces_the_dense_folder(tmp_path):
    model = _tiny_pruned()
    save_pruned(model, None, tmp_path / "m", _record())
    sparse.pack_folder(tmp_path / "m", tmp_path / "m")
    assert sparse.is_sparse_folder(tmp_path / "m") and not (tmp_path / "m" / "model.safetensors").exists()
    assert _state_bits_equal(sparse_load.load_pretrained(tmp_path / "m"), model)


def test_wrong_inputs_are_user_errors(tmp_path):
    model = _tiny_pruned()
    save_pruned(model, None, tmp_path / "dense", _record())
    save_pruned(model, None, tmp_path / "sparse", _record(), save_format="sparse")
    with pytest.raises(UserError, match="not a sparse model folder"):
        sparse.unpack_folder(tmp_path / "dense", tmp_path / "x")
    with pytest.raises(UserError, match="already a sparse folder"):
        sparse.pack_folder(tmp_path / "sparse", tmp_path / "x")
    with pytest.raises(UserError, match="not a folder"):
        sparse.pack_folder(tmp_path / "nothing", tmp_path / "x")
    with pytest.raises(UserError, match="unknown save format"):
        save_pruned(model, None, tmp_path / "y", _record(), save_format="csr")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda d: (d / "model.sparse.safetensors").write_bytes(b"\x10\x00garbage"), "damaged"),
        (lambda d: _truncate(d / "model.sparse.safetensors"), "damaged"),
        (lambda d: (d / "model.sparse.json").write_text("{"), "not a valid sparse index"),
        (lambda d: _edit_index(d, lambda i: i.update(version=99)), "version 99"),
        (lambda d: _edit_index(d, lambda i: next(iter(_nondense(i))).update(shape=[3, 3])), "damaged"),
    ],
)
def test_a_damaged_sparse_folder_is_a_user_error(tmp_path, damage, needle):
    save_pruned(_tiny_pruned(), None, tmp_path / "s", _record(), save_format="sparse")
    damage(tmp_path / "s")
    with pytest.raises(UserError, match=needle):
        sparse_load.load_pretrained(tmp_path / "s")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_index(folder, edit):
    index = json.loads((folder / "model.sparse.json").read_text())
    edit(index)
    (folder / "model.sparse.json").write_text(json.dumps(index))


def _nondense(index):
    return [e for e in index["tensors"].values() if e["layout"] != "dense"]


def test_an_interrupted_pack_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    model = _tiny_pruned(torch.float32)
    model.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    real_save = sparse._save
    calls = []

    def save_then_stop(tensors, path, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(tensors, path, metadata)

    monkeypatch.setattr(sparse, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sparse.pack_folder(tmp_path / "dense", tmp_path / "packed")
    assert not (tmp_path / "packed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no temp folder left either


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_pruned_image_classifier_round_trips_through_a_sparse_folder(tmp_path, kind):
    """An image classifier saved sparse loads (load_model, load_pretrained) as its class, bit-identical,
    with its image processor; plain from_pretrained refuses the folder."""
    from transformers import ViTImageProcessor

    import d2prune
    from d2prune.io.models import load_model
    from vision_models import build_tiny_classifier, make_images

    model = build_tiny_classifier(kind)
    pixels, labels = make_images(16)
    d2prune.prune(
        model, {"pixel_values": pixels, "labels": labels}, d2prune.PruneConfig(method="wanda", progress=False)
    )
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    save_pruned(model, processor, tmp_path / "s", _record(), save_format="sparse")
    loaded, loaded_processor = load_model(str(tmp_path / "s"))
    assert type(loaded) is type(model) and _state_bits_equal(loaded, model)
    assert type(loaded_processor).__name__.startswith("ViTImageProcessor")  # the PIL one without torchvision
    plain = sparse_load.load_pretrained(tmp_path / "s")
    assert type(plain) is type(model) and _state_bits_equal(plain, model)
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=pixels).logits, model(pixel_values=pixels).logits)
    with pytest.raises(OSError):
        type(model).from_pretrained(tmp_path / "s")
