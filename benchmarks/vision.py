"""Vision benchmark: a small ViT trained here on the UCI handwritten digits, pruned by every method.

1. The 1,797 labelled 8×8 images of ``../shared/data/digits/digits.csv.gz`` are split once with a fixed
   seed (``torch.randperm`` under ``manual_seed(0)``: the first 360 are the test split, the rest the
   training split; the split's SHA-256 is recorded) and written as PNG files (grey 0..16 scaled to
   0..255, RGB) in ImageNet layout: ``runs/vision/digits/{train,test}/<digit>/<row>.png``.
2. A ViT (``ViTForImageClassification``: 8×8 images, 2×2 patches, 4 blocks, hidden 64, MLP 128,
   4 heads) is trained on the training split (AdamW, one-cycle learning rate 3e-3, 40 epochs of
   batch 64, seed 0; deterministic) and saved with its image processor as a Hugging Face folder.
3. The saved model is loaded with ``d2prune.io.models.load_model`` and pruned by every method at
   50/60/70/80 % unstructured and 2:4, calibrated on 256 training images (seed 0) read from the image
   folder through the model's own processor; each pruned model is scored on the test folder (top-1).
   The dense weights are restored between cells.

Results: ``benchmarks/results/vision_digits.json``, the table in ``benchmarks/README.md`` and
``benchmarks/results/vision_digits.png`` (accuracy vs sparsity per method).

    .venv/bin/python benchmarks/vision.py            # train if needed, prune, table and plot
    .venv/bin/python benchmarks/vision.py --table-only
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import BENCH_README, RESULTS_DIR, ROOT, replace_block

DIGITS = ROOT.parent / "shared" / "data" / "digits" / "digits.csv.gz"
RUNS = ROOT / "runs" / "vision"
RESULTS = RESULTS_DIR / "vision_digits.json"
PLOT = RESULTS_DIR / "vision_digits.png"
MARK_BEGIN, MARK_END = "<!-- vision-table:begin -->", "<!-- vision-table:end -->"
N_TEST = 360
SETTINGS = ["0.5", "0.6", "0.7", "0.8", "2:4"]
# name -> method config fields (d2prune.methods registry names); D²Prune leaves the key projection
# un-updated (its default target mapped to a ViT's names).
METHODS: dict[str, dict] = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "d2prune": {"method": "d2prune"},
    "pruner-zero": {"method": "pruner-zero"},
    "ria": {"method": "ria"},
    "dsnot": {"method": "dsnot"},
    "alps": {"method": "alps"},
    "d2alps": {"method": "d2alps"},
    "sparsegpt-refit": {"method": "sparsegpt", "refit": "cg"},
}
TRAIN = {"epochs": 40, "batch_size": 64, "lr": 3e-3, "weight_decay": 0.05, "seed": 0}
ARCH = {
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 3,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
NSAMPLES = 256


def export_digits(out: Path) -> dict:
    """Write the split as PNG folders (once); returns the split's description for the record."""
    from PIL import Image

    rows = np.loadtxt(gzip.open(DIGITS), delimiter=",", dtype=np.int64)
    images, labels = rows[:, :64].reshape(-1, 8, 8), rows[:, 64]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    split = {"test": sorted(perm[:N_TEST]), "train": sorted(perm[N_TEST:])}
    digest = hashlib.sha256(json.dumps(split).encode()).hexdigest()
    marker = out / "split.json"
    if not (marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest):
        for part, indices in split.items():
            for i in indices:
                path = out / part / str(labels[i]) / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                grey = (images[i] * 255 // 16).astype(np.uint8)
                Image.fromarray(grey, mode="L").convert("RGB").save(path)
        marker.write_text(json.dumps({"sha256": digest, **split}))
    return {"sha256": digest, "train": len(split["train"]), "test": len(split["test"]), "seed": 0}


def train(data: Path, out: Path) -> dict:
    """Train the ViT on ``data/train`` and save it with its processor in ``out``; returns its record."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from d2prune.data.images import get_image_calibration, image_folder

    processor = ViTImageProcessor(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    n_train = len(image_folder(data / "train"))
    train_set = get_image_calibration(processor, data / "train", n_train, seed=TRAIN["seed"])
    x, y = train_set["pixel_values"], train_set["labels"]
    torch.manual_seed(TRAIN["seed"])
    labels = {i: str(i) for i in range(10)}
    model = ViTForImageClassification(
        ViTConfig(**ARCH, num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()})
    )
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    per_epoch = -(-len(y) // TRAIN["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, TRAIN["lr"], total_steps=TRAIN["epochs"] * per_epoch, pct_start=0.1
    )
    t0 = time.perf_counter()
    model.train()
    for epoch in range(TRAIN["epochs"]):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(y), TRAIN["batch_size"]):
            b = order[i : i + TRAIN["batch_size"]]
            loss = model(pixel_values=x[b], labels=y[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"train_seconds": round(time.perf_counter() - t0, 1), "final_loss": loss.item(), **TRAIN, **ARCH}


def accuracy(model, batches) -> float:
    from d2prune.evaluation.accuracy import evaluate_accuracy

    return evaluate_accuracy(model, batches, progress=False).top1


def prune_all(model_dir: Path, data: Path, methods: list[str], settings: list[str]) -> list[dict]:
    """Every (method, setting) cell on the saved model, dense weights restored between cells."""
    from d2prune.api import prune
    from d2prune.config import PruneConfig
    from d2prune.data.images import ImageBatches, get_image_calibration, image_folder
    from d2prune.io.models import load_model

    model, processor = load_model(str(model_dir))
    label2id, num_labels = model.config.label2id, model.config.num_labels
    calibration = get_image_calibration(processor, data / "train", NSAMPLES, 0, label2id, num_labels)
    test = ImageBatches(processor, image_folder(data / "test", label2id, num_labels), 128)
    test = [test[i] for i in range(len(test))]  # preprocessed once for every cell
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"method": "dense", "setting": "-", "sparsity": 0.0, "top1": accuracy(model, test)}]
    print(f"dense: top-1 {rows[0]['top1']:.4f}", flush=True)
    for name in methods:
        for setting in settings:
            fields = dict(METHODS[name])
            refit = fields.pop("refit", "none")
            pattern = setting if ":" in setting else "unstructured"
            sparsity = 0.5 if ":" in setting else float(setting)
            config = PruneConfig(
                method=fields.pop("method"), sparsity=sparsity, pattern=pattern, refit=refit, progress=False
            )
            model.load_state_dict(dense_state)
            t0 = time.perf_counter()
            report = prune(model, calibration, config)
            seconds = time.perf_counter() - t0
            row = {
                "method": name,
                "setting": setting,
                "sparsity": report.overall_sparsity,
                "top1": accuracy(model, test),
                "prune_s": round(seconds, 2),
            }
            rows.append(row)
            print(f"{name} {setting}: top-1 {row['top1']:.4f} ({seconds:.1f} s)", flush=True)
    model.load_state_dict(dense_state)
    return rows


def table(results: dict) -> str:
    rows = results["rows"]
    dense = next(r["top1"] for r in rows if r["method"] == "dense")
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    head = "| method | " + " | ".join(f"{s} unstructured" if ":" not in s else s for s in settings) + " |"
    lines = [head, "|---" * (len(settings) + 1) + "|", f"| dense | {dense:.1%}" + " |" * len(settings)]
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        cells = {r["setting"]: r["top1"] for r in rows if r["method"] == name}
        lines.append(f"| {name} | " + " | ".join(f"{cells[s]:.1%}" if s in cells else "–" for s in settings) + " |")
    return "\n".join(lines)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    dense = next(r["top1"] for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((float(r["setting"]), r["top1"]) for r in rows if r["method"] == name and ":" not in r["setting"])
        (line,) = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
        nm = [r["top1"] for r in rows if r["method"] == name and r["setting"] == "2:4"]
        if nm:
            ax.scatter([0.5], [100 * nm[0]], marker="x", s=60, color=line.get_color())
    ax.axhline(100 * dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity (x: 2:4)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("ViT on UCI digits (8×8): accuracy after one-shot pruning")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def write_readme(results: dict) -> None:
    text = (
        f"Produced by: `{results['command']}` on {results['date']} (commit {results['commit']}, "
        f"{results['machine']}); training took {results['model']['train_seconds']} s. Calibration: "
        f"{NSAMPLES} training images (seed 0); test split: {results['split']['test']} images "
        f"(split SHA-256 {results['split']['sha256'][:12]}…).\n\n" + table(results) + "\n\n"
        "![accuracy vs sparsity](results/vision_digits.png)\n"
    )
    replace_block(BENCH_README, MARK_BEGIN, MARK_END, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    ap.add_argument("--retrain", action="store_true", help="train the model again even if it is saved")
    ap.add_argument("--table-only", action="store_true", help="regenerate the table and plot from the results")
    args = ap.parse_args()
    if args.table_only:
        results = json.loads(RESULTS.read_text())
    else:
        import subprocess

        torch.set_num_threads(1)  # the matrices are tiny: a second thread only adds synchronization
        data, model_dir = RUNS / "digits", RUNS / "vit-digits"
        split = export_digits(data)
        record_file = model_dir / "training.json"
        if args.retrain or not record_file.is_file():
            record = train(data, model_dir)
            record_file.write_text(json.dumps(record, indent=1))
        rows = prune_all(model_dir, data, args.methods, args.settings)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        results = {
            "command": " ".join([".venv/bin/python benchmarks/vision.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"),
            "commit": commit.stdout.strip(),
            "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
            "split": split,
            "model": json.loads(record_file.read_text()),
            "nsamples": NSAMPLES,
            "rows": rows,
        }
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)
    write_readme(results)
    print(table(results))


if __name__ == "__main__":
    main()
