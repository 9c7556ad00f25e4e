"""The options of ``d2prune prune`` (``d2prune sweep`` builds its grid on the same ones)."""

from __future__ import annotations

import argparse

from d2prune.cli.method_options import add_method_choice, add_method_options, heldout_options
from d2prune.cli.options import add_model_args, argument_group
from d2prune.methods.base import REFIT_GROUP


def add_prune_options(pr: argparse.ArgumentParser) -> None:
    """Every option of ``d2prune prune`` (``d2prune sweep`` builds on them)."""
    add_model_args(pr)
    add_method_choice(pr)
    pr.add_argument("--sparsity", "--sparsity_ratio", type=float, default=0.5, help="target sparsity (default 0.5)")
    pr.add_argument(
        "--pattern",
        "--sparsity_type",
        default="unstructured",
        help="unstructured or N:M, N zeros per M (2:4, 4:8, 3:4)",
    )
    pr.add_argument("--prune_n", type=int, default=0, help=argparse.SUPPRESS)
    pr.add_argument("--prune_m", type=int, default=0, help=argparse.SUPPRESS)
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows or images (default 128)")
    pr.add_argument(
        "--calib",
        "--cali_dataset",
        default="c4",
        help="calibration source: c4, a file or a folder (default c4); an image classifier's: an image "
        "folder (DIR/CLASS/IMAGE)",
    )
    pr.add_argument(
        "--calib-data-path", "--cali_data_path", default=None, help="file or folder for the calibration source"
    )
    pr.add_argument("--batch-size", type=int, default=1, help="calibration windows per layer forward (default 1)")
    pr.add_argument("--eval-dense", action="store_true", help="also measure the dense model's perplexity first")
    pr.add_argument(
        "--save-model",
        "--save_model",
        nargs="?",
        const=True,
        default=None,
        help="save the pruned model (to PATH, or OUTPUT_DIR/model)",
    )
    pr.add_argument(
        "--save-format",
        choices=["dense", "sparse"],
        default="dense",
        help="dense (default): plain transformers folder; sparse: kept values + 1-bit mask, "
        "loaded by d2prune (d2prune unpack makes it dense)",
    )
    pr.add_argument("--no-measure-error", action="store_true", help="skip the reconstruction-error statistic (faster)")
    pr.add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="continue an interrupted --offload disk run whose --output-dir was OUT (repeat its command)",
    )
    ls = pr.add_argument_group("layer-wise sparsity")
    ls.add_argument(
        "--sparsity-profile", default="uniform", help="uniform (default) or owl (outlier-weighted, per layer)"
    )
    ls.add_argument(
        "--owl-lambda", type=float, default=0.08, help="OWL: per-layer sparsities within [p-λ, p+λ] (default 0.08)"
    )
    ls.add_argument("--owl-m", type=float, default=5.0, help="OWL: outlier threshold, times the mean score (default 5)")
    ls.add_argument(
        "--layer-sparsities",
        nargs="+",
        default=None,
        help="explicit per-decoder-layer sparsities (numbers, or one JSON file holding a list)",
    )
    rf = argument_group(pr, REFIT_GROUP)
    rf.add_argument(
        "--refit",
        choices=["cg", "none"],
        default="none",
        help="cg: re-solve each pruned linear's kept weights for the least output error on its mask "
        "(batched preconditioned conjugate gradients); none (default): keep the method's weights",
    )
    rf.add_argument("--refit-iters", type=int, default=100, help="most CG iterations per linear (default 100)")
    hs = pr.add_argument_group(heldout_title())
    hs.add_argument("--heldout-source", default=None, help="held-out text source (default: the calibration source)")
    hs.add_argument(
        "--heldout-windows",
        type=int,
        default=16,
        help="held-out windows, or images for an image classifier (default 16)",
    )
    hs.add_argument("--heldout-seed", type=int, default=1, help="seed of the held-out draw (default 1)")
    add_method_options(pr)


def heldout_title() -> str:
    """The held-out section's title, naming the option values that ask for a choice and what they choose."""
    asked = [
        f"{opt.flag} {opt.metadata['heldout']['value']}: held-out choice of {opt.metadata['heldout']['choice']}"
        for opt in heldout_options()
    ]
    return "; ".join(asked) or "held-out choice"
