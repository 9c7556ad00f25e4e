"""A battery of bad inputs against every command that loads a model (prune, eval, finetune, attention,
sweep, pack, unpack; image classifiers too).

Each case must end with exit code 2, exactly one ``d2prune: error:`` line that says what is wrong
(``needle``), no traceback, and no output that looks complete (no run.json, no folder holding a
config.json with weights). The CLI runs in-process (``d2prune.cli.main.main``); the model is one tiny
random LLaMA folder saved with safetensors and the tokenizer of the shared tiny LLaMA, copied and
damaged per case where the case needs it.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tests.conftest import DATA, TINY, needs_assets

from d2prune.cli.main import main

pytestmark = needs_assets

QUICK = ("--nsamples", "2", "--seqlen", "32", "--no-progress", "--data-dir", str(DATA), "--eval", "none")
EVAL = ("--seqlen", "32", "--eval-windows", "2", "--no-progress", "--data-dir", str(DATA))
ATTENTION = ("--windows", "2", "--seqlen", "32", "--no-progress", "--data-dir", str(DATA))
FINETUNE = (
    *("--max-steps", "2", "--save-steps", "1", "--block-size", "32", "--max-train-samples", "4"),
    *("--no-progress", "--data-dir", str(DATA), "--eval", "none"),
)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random LLaMA (2 layers, hidden 32) with the shared tiny LLaMA's 512-token tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("bad-inputs") / "tiny"
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TINY / name, folder / name)
    return folder


# ------------------------------------------------------------------------------------------ damage


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return damage


def _set(name: str, index: tuple, value: float):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name][index] = value

    return edit


def _corrupt_header(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[:8] = b"\xff" * 8  # header length 2**64 - 1
    (folder / WEIGHTS).write_bytes(bytes(data))


def _truncate(name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return damage


def _write(name: str, text: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_text(text)

    return damage


def _index_naming(shard: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(folder / WEIGHTS), framework="pt") as fh:
            names = list(fh.keys())
        index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return damage


def _config_folder(folder: Path) -> None:
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()


def _unknown_architecture(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="frobnicator", architectures=["FrobnicatorForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()


# ------------------------------------------------------------------------------ prepared state


def _unreadable(suffix: str) -> Callable[[Path, Path, pytest.MonkeyPatch], None]:
    """Files of the model copy ending in ``suffix`` cannot be opened: chmod 000, or (as root, whom
    chmod does not stop) an ``open`` that raises what the kernel would."""

    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        target = next(p for p in model.iterdir() if p.name.endswith(suffix))
        if os.geteuid() != 0:
            target.chmod(0)
            return
        real_open = builtins.open

        def guarded(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(target):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded)

    return prepare


def _disk_full(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fsync of a written file fails as on a full disk (the atomic writers sync before renaming)."""
    from d2prune.io import atomic

    def full(path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))

    monkeypatch.setattr(atomic, "fsync_file", full)


def _file(name: str, data: bytes) -> Callable[[Path, Path, pytest.MonkeyPatch], None]:
    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp / name).write_bytes(data)

    return prepare


def _folder(name: str) -> Callable[[Path, Path, pytest.MonkeyPatch], None]:
    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp / name).mkdir()

    return prepare


def _gguf(cut: float | None) -> Callable[[Path, Path, pytest.MonkeyPatch], None]:
    """``tmp/tiny.gguf``: a tiny GGUF cut to ``cut`` of its length, or garbage (None)."""

    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp / "tiny.gguf"
        if cut is None:
            path.write_bytes(b"GGUF but not really" * 10)
            return
        from tests.io.test_models import write_tiny_gguf

        data = write_tiny_gguf(path, tied=True).read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])

    return prepare


def _interrupted_stream(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``out/run`` holds a streamed prune (sparsity 0.5) interrupted after its first layer."""
    from d2prune.streaming.store import StreamedStore

    def stop(index: int) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(StreamedStore, "_kill_if_asked", staticmethod(stop))
        rc = main(["prune", str(model), *QUICK, "--offload", "disk", "--output-dir", str(tmp / "out" / "run")])
    assert rc == 130


def _damaged_progress(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _interrupted_stream(tmp, model, monkeypatch)
    # A streamed run's work folder sits next to its target, OUTPUT_DIR/model.
    (tmp / "out" / "run" / ".model.partial" / "progress.json").write_text('{"format": 1}')


def _finetune_checkpoint(damage: Callable[[Path], None] | None):
    """``out/run/checkpoints`` holds the step-2 checkpoint of a finished run, as a killed run would
    have left it; ``damage`` is then applied to that checkpoint folder."""

    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        done = tmp / "prep"
        assert main(["finetune", str(model), "--output-dir", str(done), *FINETUNE]) == 0
        target = tmp / "out" / "run" / "checkpoints"
        shutil.copytree(done / "checkpoints", target)
        shutil.rmtree(done)  # a finished run: not this battery's output
        if damage is not None:
            damage(next(target.iterdir()))

    return prepare


def _vit_and_images(damage: str | None) -> Callable[[Path, Path, pytest.MonkeyPatch], None]:
    """``tmp/vit``: a tiny random ViT with its image processor; ``tmp/images``: a labelled folder of
    two classes (two PNGs each), then ``damage``: "empty" (class folders without images) or "garbage"
    (one .png that is not an image)."""

    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from PIL import Image
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        torch.manual_seed(0)
        config = ViTConfig(
            image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, num_labels=2,
        )  # fmt: skip
        ViTForImageClassification(config).eval().save_pretrained(tmp / "vit")
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp / "vit")
        for label in ("0", "1"):
            folder = tmp / "images" / label
            folder.mkdir(parents=True)
            for i in range(0 if damage == "empty" else 2):
                Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(folder / f"{i}.png")
        if damage == "garbage":
            (tmp / "images" / "1" / "1.png").write_bytes(b"not a png" * 10)

    return prepare


def _packed(damage: Callable[[Path], None] | None) -> Callable[[Path, Path, pytest.MonkeyPatch], None]:
    """``tmp/packed``: the model packed into a sparse folder (``d2prune pack``), then ``damage``."""

    def prepare(tmp: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        assert main(["pack", str(model), str(tmp / "packed")]) == 0
        if damage is not None:
            damage(tmp / "packed")

    return prepare


# ------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Case:
    """One bad input. ``argv`` placeholders: {model} (the tiny model, or its damaged copy), {tmp},
    {out} (``tmp/out/run``); ``needle`` must be in the error line."""

    id: str
    argv: tuple[str, ...]
    needle: str
    damage: Callable[[Path], None] | None = None
    prepare: Callable[[Path, Path, pytest.MonkeyPatch], None] | None = None


NAN_DOWN = _edit_tensors(_set("model.layers.0.mlp.down_proj.weight", (0, 0), float("nan")))
PRUNE = ("prune", "{model}", *QUICK)
DISK = ("--offload", "disk", "--output-dir", "{out}")

CASES = [
    # Model files: missing, damaged, of the wrong kind.
    Case("prune-missing-model", ("prune", "{tmp}/nope", *QUICK), "does not exist"),
    Case("prune-model-is-text", ("prune", "{tmp}/notes.txt", *QUICK), "not a .gguf", prepare=_file("notes.txt", b"hi")),
    Case("prune-corrupt-safetensors", PRUNE, WEIGHTS, _corrupt_header),
    Case("prune-truncated-safetensors", PRUNE, WEIGHTS, _truncate(WEIGHTS)),
    Case("prune-broken-index", PRUNE, "model.safetensors.index.json", _write("model.safetensors.index.json", "{no")),
    Case(
        "prune-index-names-missing-shard",
        PRUNE,
        "model-00002-of-00002.safetensors",
        _index_naming("model-00002-of-00002.safetensors"),
    ),
    Case("prune-broken-config", PRUNE, "config.json", _write("config.json", '{"model_type": "llama",')),
    Case("prune-config-is-a-folder", PRUNE, "config.json", _config_folder),
    Case("prune-unknown-architecture", PRUNE, "frobnicator", _unknown_architecture),
    Case("prune-no-tokenizer", PRUNE, "tokenizer", _no_tokenizer),
    Case("prune-unreadable-config", PRUNE, "config.json", prepare=_unreadable("config.json")),
    Case("prune-unreadable-weights", PRUNE, WEIGHTS, prepare=_unreadable(WEIGHTS)),
    Case("prune-truncated-gguf", ("prune", "{tmp}/tiny.gguf", *QUICK), "tiny.gguf", prepare=_gguf(0.5)),
    Case("prune-gguf-header-cut", ("prune", "{tmp}/tiny.gguf", *QUICK), "tiny.gguf", prepare=_gguf(0.01)),
    Case("prune-garbage-gguf", ("prune", "{tmp}/tiny.gguf", *QUICK), "tiny.gguf", prepare=_gguf(None)),
    # The same through the streamed path, which reads the shards itself.
    Case("prune-disk-corrupt-safetensors", (*PRUNE, *DISK), WEIGHTS, _corrupt_header),
    Case("prune-disk-truncated-safetensors", (*PRUNE, *DISK), WEIGHTS, _truncate(WEIGHTS)),
    Case(
        "prune-disk-broken-index",
        (*PRUNE, *DISK),
        "model.safetensors.index.json",
        _write("model.safetensors.index.json", '{"weight_map": 3}'),
    ),
    Case("prune-disk-broken-config", (*PRUNE, *DISK), "config.json", _write("config.json", "[1, 2")),
    Case("prune-disk-unknown-architecture", (*PRUNE, *DISK), "frobnicator", _unknown_architecture),
    Case("prune-disk-no-tokenizer", (*PRUNE, *DISK), "tokenizer", _no_tokenizer),
    # Non-finite values: the tensor or the layer named, with the likely cause.
    Case("prune-nan-weight", PRUNE, "model.layers.0.mlp.down_proj.weight holds NaN/inf", NAN_DOWN),
    Case("prune-disk-nan-weight", (*PRUNE, *DISK), "model.layers.0.mlp.down_proj.weight", NAN_DOWN),
    Case(
        "prune-inf-embedding",
        PRUNE,
        "model.embed_tokens.weight holds NaN/inf",
        _edit_tensors(_set("model.embed_tokens.weight", slice(None), float("inf"))),
    ),
    Case(  # float16 weights that fit, activations that do not (max 65504)
        "prune-overflow-after-pruning",
        (*PRUNE, "--method", "magnitude", "--dtype", "float16"),
        "outputs of decoder layer 0 hold NaN/inf after pruning: the forward overflowed in half precision",
        _edit_tensors(_set("model.layers.0.post_attention_layernorm.weight", slice(None), 6e4)),
    ),
    # Options.
    Case("prune-sparsity-1", (*PRUNE, "--sparsity", "1.0"), "sparsity must be in [0, 1)"),
    Case("prune-pattern-4-2", (*PRUNE, "--pattern", "4:2"), "0 < N < M"),
    Case("prune-unknown-method", (*PRUNE, "--method", "obs"), "unknown method"),
    Case("prune-unknown-target-layer", (*PRUNE, "--target-layers", "self_attn.z_proj"), "self_attn.z_proj"),
    Case("prune-unknown-flag", (*PRUNE, "--frobnicate"), "unrecognized arguments"),
    # Calibration data.
    Case("prune-missing-calib", (*PRUNE, "--calib", "{tmp}/none.jsonl"), "none.jsonl"),
    Case("prune-empty-calib", (*PRUNE, "--calib", "{tmp}/empty.txt"), "empty.txt", prepare=_file("empty.txt", b"")),
    Case(
        "prune-garbage-calib",
        (*PRUNE, "--calib", "{tmp}/garbage.jsonl"),
        "garbage.jsonl",
        prepare=_file("garbage.jsonl", bytes(range(256)) * 4),
    ),
    Case("prune-calib-empty-folder", (*PRUNE, "--calib", "{tmp}/texts"), "texts", prepare=_folder("texts")),
    # Outputs.
    Case(
        "prune-output-is-a-file",
        (*PRUNE, "--output-dir", "{tmp}/taken", "--save-model"),
        "taken",
        prepare=_file("taken", b"x"),
    ),
    Case(
        "prune-disk-full-saving-model",
        (*PRUNE, "--output-dir", "{out}", "--save-model"),
        "No space left",
        prepare=_disk_full,
    ),
    Case("prune-disk-full-run-record", (*PRUNE, "--output-dir", "{out}"), "No space left", prepare=_disk_full),
    Case("prune-disk-full-streamed-shard", (*PRUNE, *DISK), "No space left", prepare=_disk_full),
    # Resuming.
    Case(
        "prune-resume-other-config",
        (*PRUNE, "--sparsity", "0.6", "--resume", "{out}"),
        "differ from the interrupted run",
        prepare=_interrupted_stream,
    ),
    Case("prune-resume-damaged-progress", (*PRUNE, "--resume", "{out}"), "progress record", prepare=_damaged_progress),
    # eval
    Case("eval-missing-model", ("eval", "{tmp}/nope", *EVAL), "does not exist"),
    Case("eval-corrupt-safetensors", ("eval", "{model}", *EVAL), WEIGHTS, _corrupt_header),
    Case(
        "eval-disk-truncated-safetensors", ("eval", "{model}", *EVAL, "--offload", "disk"), WEIGHTS, _truncate(WEIGHTS)
    ),
    Case("eval-disk-nan-weight", ("eval", "{model}", *EVAL, "--offload", "disk"), "down_proj.weight", NAN_DOWN),
    Case("eval-nan-weight", ("eval", "{model}", *EVAL), "model.layers.0.mlp.down_proj.weight holds NaN/inf", NAN_DOWN),
    Case("eval-truncated-gguf", ("eval", "{tmp}/tiny.gguf", *EVAL), "tiny.gguf", prepare=_gguf(0.5)),
    Case("eval-missing-eval-file", ("eval", "{model}", *EVAL[:-2], "--eval", "{tmp}/none.txt"), "none.txt"),
    # finetune
    Case(
        "finetune-corrupt-safetensors",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE),
        WEIGHTS,
        _corrupt_header,
    ),
    Case(
        "finetune-broken-config",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE),
        "config.json",
        _write("config.json", ""),
    ),
    Case(
        "finetune-nan-weight",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE),
        "model.layers.0.mlp.down_proj.weight",
        NAN_DOWN,
    ),
    Case("finetune-no-output-dir", ("finetune", "{model}", *FINETUNE), "--output-dir"),
    Case(
        "finetune-resume-nothing",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE, "--resume"),
        "no checkpoint",
    ),
    Case(
        "finetune-resume-other-run",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE, "--lr", "0.01", "--resume"),
        "different run",
        prepare=_finetune_checkpoint(None),
    ),
    Case(
        "finetune-resume-truncated-adapter",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE, "--resume"),
        "adapter.safetensors",
        prepare=_finetune_checkpoint(_truncate("adapter.safetensors")),
    ),
    Case(
        "finetune-resume-truncated-optimizer",
        ("finetune", "{model}", "--output-dir", "{out}", *FINETUNE, "--resume"),
        "optimizer.pt",
        prepare=_finetune_checkpoint(_truncate("optimizer.pt")),
    ),
    # attention
    Case(
        "attention-missing-dense",
        ("attention", "{tmp}/nope", "{model}", "--output-dir", "{out}", *ATTENTION),
        "does not exist",
    ),
    Case(
        "attention-corrupt-pruned",
        ("attention", "{model}", "{model}", "--output-dir", "{out}", *ATTENTION),
        WEIGHTS,
        _corrupt_header,
    ),
    Case(
        "attention-garbage-gguf",
        ("attention", "{tmp}/tiny.gguf", "{model}", "--output-dir", "{out}", *ATTENTION),
        "tiny.gguf",
        prepare=_gguf(None),
    ),
    Case(
        "attention-nan-weight",
        ("attention", "{model}", "{model}", "--output-dir", "{out}", *ATTENTION),
        "model.layers.0.mlp.down_proj.weight",
        NAN_DOWN,
    ),
    Case(
        "attention-output-is-a-file",
        ("attention", "{model}", "{model}", "--output-dir", "{tmp}/taken", *ATTENTION),
        "taken",
        prepare=_file("taken", b"x"),
    ),
    # sweep (a grid of prune runs on one loaded model)
    Case("sweep-corrupt-safetensors", ("sweep", "{model}", *QUICK, "--output-dir", "{out}"), WEIGHTS, _corrupt_header),
    Case(
        "sweep-unknown-method",
        ("sweep", "{model}", *QUICK, "--methods", "wandaa", "--output-dir", "{out}"),
        "unknown method or variant 'wandaa'",
    ),
    Case(
        "sweep-sparsity-out-of-range",
        ("sweep", "{model}", *QUICK, "--methods", "wanda", "--sparsities", "1.5", "--output-dir", "{out}"),
        "sparsity must be in [0, 1)",
    ),
    Case("sweep-no-output-dir", ("sweep", "{model}", *QUICK, "--methods", "wanda"), "--output-dir"),
    Case(
        "sweep-offload-disk",
        ("sweep", "{model}", *QUICK, "--methods", "wanda", "--offload", "disk", "--output-dir", "{out}"),
        "--offload",
    ),
    # pack / unpack (compact sparse checkpoints)
    Case("pack-missing-folder", ("pack", "{tmp}/nope", "{out}"), "is not a folder"),
    Case("pack-corrupt-safetensors", ("pack", "{model}", "{out}"), WEIGHTS, _corrupt_header),
    Case("pack-already-sparse", ("pack", "{tmp}/packed", "{out}"), "already a sparse folder", prepare=_packed(None)),
    Case("unpack-dense-folder", ("unpack", "{model}", "{out}"), "is not a sparse model folder"),
    Case(
        "unpack-truncated-sparse-file",
        ("unpack", "{tmp}/packed", "{out}"),
        "model.sparse.safetensors",
        prepare=_packed(_truncate("model.sparse.safetensors")),
    ),
    Case(
        "eval-damaged-sparse-index",
        ("eval", "{tmp}/packed", *EVAL),
        "model.sparse.json",
        prepare=_packed(_write("model.sparse.json", '{"format": "d2prune-sparse"')),
    ),
    Case("prune-unknown-save-format", (*PRUNE, "--save-format", "zip"), "zip"),
    # Image classifiers: image folders and options that do not fit the model.
    Case(
        "prune-vision-no-images",
        ("prune", "{tmp}/vit", "--calib", "{tmp}/images", "--nsamples", "2", "--no-progress"),
        "has no images",
        prepare=_vit_and_images("empty"),
    ),
    Case(
        "prune-vision-unreadable-image",
        ("prune", "{tmp}/vit", "--calib", "{tmp}/images", "--nsamples", "4", "--no-progress"),
        "cannot read image",
        prepare=_vit_and_images("garbage"),
    ),
    Case(
        "prune-vision-too-many-images",
        ("prune", "{tmp}/vit", "--calib", "{tmp}/images", "--nsamples", "9", "--no-progress"),
        "asks for more",
        prepare=_vit_and_images(None),
    ),
    Case(
        "prune-vision-text-calibration",
        ("prune", "{tmp}/vit", "--nsamples", "2", "--no-progress", "--data-dir", str(DATA)),
        "calibrates on images",
        prepare=_vit_and_images(None),
    ),
    Case(
        "eval-images-on-a-causal-lm",
        ("eval", "{model}", *EVAL, "--eval-images", "{tmp}/images"),
        "causal LM",
        prepare=_vit_and_images(None),
    ),
]


def _looks_complete(root: Path) -> list[Path]:
    """Run records, and folders holding a config.json with weights, under ``root``."""
    found = list(root.rglob("run.json")) + list(root.rglob("attention.json"))
    for config in root.rglob("config.json"):
        folder = config.parent
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")):
            found.append(folder)
    return found


def test_the_battery_is_big_enough():
    commands = {case.argv[0] for case in CASES}
    assert len(CASES) >= 25 and commands == {"prune", "eval", "finetune", "attention", "pack", "unpack", "sweep"}
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_exit_2(case: Case, tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("D2PRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_folder
    if case.damage is not None:
        model = tmp_path / "in" / "tiny"
        shutil.copytree(tiny_folder, model)
        case.damage(model)
    (tmp_path / "out").mkdir()
    if case.prepare is not None:
        case.prepare(tmp_path, model, monkeypatch)
    capsys.readouterr()  # what a preparing run printed is not this case's output
    argv = [a.format(model=model, tmp=tmp_path, out=tmp_path / "out" / "run") for a in case.argv]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("d2prune: error:")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert case.needle in lines[0], err
    assert "Traceback" not in err
    assert _looks_complete(tmp_path / "out") == []
    if "{tmp}/taken" in case.argv:
        assert (tmp_path / "taken").read_bytes() == b"x"


def test_damaged_model_from_the_command_line(tiny_folder, tmp_path):
    """The reported case end to end, through the real entry point: a corrupt model.safetensors."""
    model = tmp_path / "tiny"
    shutil.copytree(tiny_folder, model)
    _corrupt_header(model)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "d2prune", "prune", str(model), *QUICK, "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={"D2PRUNE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root / "src")},
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("d2prune: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{model / WEIGHTS} is not a valid safetensors file" in proc.stderr
    assert not (tmp_path / "out").exists()
