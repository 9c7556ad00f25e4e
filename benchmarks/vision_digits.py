"""A trained image classifier, pruned: a 4-block ViT trained on the UCI handwritten digits of the
shared data folder, then pruned with every method (calibration: 128 training images; evaluation: the
397 held-out images), unstructured 60% and 2:4. Writes benchmarks/results/vision_digits.json.

    .venv/bin/python benchmarks/vision_digits.py [--data ../shared/data/digits/digits.csv.gz]

The split (seeded permutation: 1400 training, 397 test images), the model and the training are fixed
by the seed; 8×8 grey images are upsampled (nearest) to 16×16 and repeated over 3 channels.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

import d2prune
from d2prune.evaluation.accuracy import evaluate_accuracy

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["magnitude", "wanda", "sparsegpt", "d2prune", "pruner-zero", "alps", "d2alps", "ria", "dsnot"]


def digits(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.loadtxt(gzip.open(path), delimiter=",")
    x = torch.tensor(rows[:, :64], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = torch.nn.functional.interpolate(x, size=16, mode="nearest").repeat(1, 3, 1, 1)
    return (x - 0.5) / 0.5, torch.tensor(rows[:, 64], dtype=torch.long)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "digits" / "digits.csv.gz"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision_digits.json"))
    args = ap.parse_args()
    x, y = digits(Path(args.data))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    t0 = time.perf_counter()
    model = train(x[tr], y[tr], args.epochs)
    train_s = time.perf_counter() - t0
    test = [{"pixel_values": x[te][i : i + 128], "labels": y[te][i : i + 128]} for i in range(0, len(te), 128)]
    calib = {"pixel_values": x[tr[:128]], "labels": y[tr[:128]]}
    dense = evaluate_accuracy(model, test, progress=False).to_dict()
    rows = []
    for pattern, sparsity in (("unstructured", 0.6), ("2:4", 0.5)):
        for method in METHODS:
            pruned = copy.deepcopy(model)
            config = d2prune.PruneConfig(
                method=method, sparsity=sparsity, pattern=pattern, batch_size=32, progress=False
            )
            report = d2prune.prune(pruned, calib, config)
            result = evaluate_accuracy(pruned, test, progress=False).to_dict()
            rows.append({"pattern": pattern, "sparsity": report.overall_sparsity, "method": method, **result})
            print(f"{pattern:12s} {method:12s} top-1 {100 * result['top1']:5.1f}  loss {result['loss']:.3f}")
    record = {
        "dense": dense,
        "train_s": train_s,
        "epochs": args.epochs,
        "n_train": 1400,
        "n_test": len(te),
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"dense top-1 {100 * dense['top1']:.1f}; written {args.out}")


if __name__ == "__main__":
    main()
