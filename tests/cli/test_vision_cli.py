"""``d2prune prune`` and ``d2prune eval`` on an image classifier told from its config: calibration
images from a folder, top-1/top-5 in the table and run.json, save → reload, --offload disk with
--resume, and one-line errors (exit 2) for bad folders, unreadable images and text-only options."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from conftest import TINY
from d2prune.cli import main
from d2prune.data.images import ImageBatches, image_folder
from d2prune.evaluation.accuracy import evaluate_accuracy
from d2prune.streaming import store as streaming_store
from vision_models import build_tiny_classifier, tiny_processor, write_image_folder

CLASSES = [f"c{i}" for i in range(10)]
QUICK = ["--nsamples", "8", "--no-progress", "--eval-batch-size", "4"]


@pytest.fixture
def assets(tmp_path):
    """A saved tiny ViT with its processor, a training folder and a validation folder."""
    model = build_tiny_classifier("vit")
    model.save_pretrained(tmp_path / "vit")
    tiny_processor().save_pretrained(tmp_path / "vit")
    write_image_folder(tmp_path / "train", CLASSES, per_class=2, seed=0)
    write_image_folder(tmp_path / "val", CLASSES, per_class=2, seed=1)
    return tmp_path


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ["sparsegpt", "pruner-zero"])
def test_prune_records_accuracy_and_the_saved_model_reloads_to_it(assets, capsys, method):
    out = assets / "out"
    args = ["prune", str(assets / "vit"), "--calib", str(assets / "train"), "--eval-images", str(assets / "val")]
    assert (
        main(
            [
                *args,
                "--method",
                method,
                "--pattern",
                "2:4",
                "--eval-dense",
                *QUICK,
                "--output-dir",
                str(out),
                "--save-model",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "dense top-1 %" in table and "pruned top-5 %" in table and "ppl" not in table
    record = json.loads((out / "run.json").read_text())
    assert "perplexity" not in record
    assert set(record["accuracy"]) == {"dense", "pruned"}
    assert record["accuracy"]["pruned"]["n_images"] == 20
    assert record["seqlen"] == 17 and record["image_size"] == [3, 16, 16] and record["nsamples"] == 8
    assert record["nm_structure_ok"] is True
    assert [s["source"] for s in record["sources"]] == [str(assets / "train"), str(assets / "val")]
    # Plain transformers reloads it; its accuracy is the one recorded.
    reloaded = ViTForImageClassification.from_pretrained(out / "model").eval()
    batches = ImageBatches(tiny_processor(), image_folder(assets / "val"), 4)
    assert evaluate_accuracy(reloaded, batches, progress=False).to_dict() == {
        k: v for k, v in record["accuracy"]["pruned"].items() if k != "source"
    }
    # As saved, the checkpoint keeps ViT's original names (attention.attention.query, ..., output.dense).
    encoder = [
        n for n in _weights(out / "model") if ".encoder.layer." in n and n.endswith("weight") and "norm" not in n
    ]
    assert len(encoder) == 12
    saved = _weights(out / "model")
    for name in encoder:
        assert (saved[name] == 0).float().mean() == 0.5, name
    dense = _weights(assets / "vit")
    assert torch.equal(saved["classifier.weight"], dense["classifier.weight"])
    # d2prune eval gives the same numbers.
    assert (
        main(
            [
                "eval",
                str(out / "model"),
                "--eval-images",
                str(assets / "val"),
                "--no-progress",
                "--output-dir",
                str(assets / "ev"),
            ]
        )
        == 0
    )
    evaluated = json.loads((assets / "ev" / "run.json").read_text())["accuracy"]["model"]
    pruned = record["accuracy"]["pruned"]
    assert evaluated["loss"] == pytest.approx(pruned["loss"], rel=1e-6)  # batches of 1 here, of 4 there
    assert {k: v for k, v in evaluated.items() if k != "loss"} == {k: v for k, v in pruned.items() if k != "loss"}


@pytest.mark.parametrize("method", ["sparsegpt", "d2prune", "wanda"])
def test_streamed_prune_matches_in_memory_and_resumes(assets, monkeypatch, method):
    common = ["prune", str(assets / "vit"), "--calib", str(assets / "train"), "--method", method, *QUICK]
    assert main([*common, "--offload", "none", "--output-dir", str(assets / "mem"), "--save-model"]) == 0

    original = streaming_store.StreamedStore.layer_done

    def stop_after_layer_0(self, index, report, acts):
        original(self, index, report, acts)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(streaming_store.StreamedStore, "layer_done", stop_after_layer_0)
    assert main([*common, "--offload", "disk", "--output-dir", str(assets / "disk")]) == 130
    monkeypatch.setattr(streaming_store.StreamedStore, "layer_done", original)
    assert main([*common, "--resume", str(assets / "disk")]) == 0
    record = json.loads((assets / "disk" / "run.json").read_text())
    assert record["resumed_at_layer"] == 1
    mem, disk = _weights(assets / "mem" / "model"), _weights(assets / "disk" / "model")
    assert mem.keys() == disk.keys()
    for name in mem:
        assert torch.equal(mem[name], disk[name]), name


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2prune: error: ") and "\n" not in err, err
    assert match in err, err


def test_user_mistakes_are_one_line_errors(assets, tmp_path, capsys):
    vit = str(assets / "vit")
    _one_line_error(capsys, ["prune", vit, *QUICK], "pass --calib IMAGE_FOLDER")
    _one_line_error(capsys, ["prune", vit, "--calib", str(tmp_path / "missing"), *QUICK], "pass --calib IMAGE_FOLDER")
    (tmp_path / "flat").mkdir()
    _one_line_error(capsys, ["prune", vit, "--calib", str(tmp_path / "flat"), *QUICK], "has no class sub-folders")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    _one_line_error(capsys, ["prune", vit, "--calib", str(tmp_path / "empty"), *QUICK], "has no images")
    broken = write_image_folder(tmp_path / "broken", ["cat"], per_class=1)
    (broken / "cat" / "bad.png").write_bytes(b"\x89PNG garbage")
    _one_line_error(
        capsys,
        ["prune", vit, "--calib", str(broken), "--nsamples", "2", "--no-progress"],
        f"cannot read image {broken / 'cat' / 'bad.png'}",
    )
    _one_line_error(capsys, ["prune", vit, "--calib", str(assets / "train"), "--nsamples", "21"], "has 20 images")
    calib = ["--calib", str(assets / "train")]
    _one_line_error(
        capsys, ["prune", vit, *calib, "--eval", "wikitext2", "ptb", *QUICK], "perplexity sets are for causal LMs"
    )
    _one_line_error(
        capsys,
        ["prune", vit, *calib, "--zero-shot", "--offload", "none", *QUICK],
        "cannot evaluate an image classifier",
    )
    _one_line_error(
        capsys,
        ["prune", vit, *calib, "--method", "d2prune", "--target-layers", "auto", "--heldout-windows", "13", *QUICK],
        "12 images left after the 8 calibration images; 13 held-out",
    )
    _one_line_error(
        capsys,
        ["prune", vit, *calib, "--method", "d2prune", "--target-layers", "self_attn.q_proj", *QUICK],
        "attention.q_proj, attention.k_proj",
    )
    _one_line_error(
        capsys, ["eval", vit, "--eval-images", str(tmp_path / "flat"), "--no-progress"], "has no class sub-folders"
    )


@pytest.mark.skipif(not TINY.exists(), reason="shared assets missing")
def test_eval_images_on_a_causal_lm_is_a_user_error(assets, capsys):
    _one_line_error(
        capsys, ["eval", str(TINY), "--eval-images", str(assets / "val"), "--no-progress"], "this model is a causal LM"
    )


def test_torchrun_prunes_and_evaluates_like_one_process(assets):
    """Two gloo ranks share the calibration images and the evaluation batches: same masks, same accuracy."""
    import os
    import subprocess
    import sys

    common = ["prune", str(assets / "vit"), "--calib", str(assets / "train"), "--eval-images", str(assets / "val")]
    common += ["--method", "sparsegpt", *QUICK, "--save-model"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "d2prune"]
        + [*common, "--output-dir", str(assets / "two"), "--dist-timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert main([*common, "--output-dir", str(assets / "one")]) == 0
    one, two = _weights(assets / "one" / "model"), _weights(assets / "two" / "model")
    for name in one:
        assert torch.equal(one[name] == 0, two[name] == 0), name
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5)
    rec1, rec2 = (json.loads((assets / o / "run.json").read_text()) for o in ("one", "two"))
    assert rec2["distributed"]["world_size"] == 2
    assert rec2["accuracy"]["pruned"]["n_images"] == rec1["accuracy"]["pruned"]["n_images"] == 20
    assert rec2["accuracy"]["pruned"]["top5"] == rec1["accuracy"]["pruned"]["top5"]


def test_target_layers_auto_chooses_on_heldout_images(assets):
    """The held-out choice scores each candidate by its mean cross-entropy on images the calibration
    did not draw; the model ends as a run with the chosen projection named gives it."""
    common = ["prune", str(assets / "vit"), "--calib", str(assets / "train"), "--method", "d2prune", *QUICK]
    assert (
        main(
            [
                *common,
                "--target-layers",
                "auto",
                "--heldout-windows",
                "6",
                "--output-dir",
                str(assets / "auto"),
                "--save-model",
            ]
        )
        == 0
    )
    choice = json.loads((assets / "auto" / "run.json").read_text())["target_search"]
    losses = choice["heldout_loss"]
    assert set(losses) == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "none"}
    assert choice["chosen"] == min(losses, key=losses.get) and choice["heldout_images"] == 6
    chosen = [] if choice["chosen"] == "none" else [choice["chosen"]]
    assert (
        main([*common, "--target-layers", *(chosen or ["none"]), "--output-dir", str(assets / "named"), "--save-model"])
        == 0
    )
    auto, named = _weights(assets / "auto" / "model"), _weights(assets / "named" / "model")
    for name in auto:
        assert torch.equal(auto[name], named[name]), name
