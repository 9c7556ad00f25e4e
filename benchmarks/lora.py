"""LoRA recovery benchmark: WikiText-2 perplexity of SmolLM2-135M pruned with D²Prune, before and
after a short masked-LoRA fine-tune on the shared C4 sample.

Per setting (70% unstructured and 2:4 by default): one ``d2prune prune ... --save-model`` run with
the quick protocol of ``benchmarks/quality.py`` (calibration 32 × 512 C4 windows, seed 0; first 64
WikiText-2 windows of 512 tokens; D²Prune with v_proj un-updated), then one ``d2prune finetune`` run
on the saved model (one epoch over STEPS × EFFECTIVE_BATCH blocks; r 8, α 16, dropout 0.05, q/v),
evaluated with the same protocol. Each run is its own ``d2prune`` process; the exact commands,
timings and results accumulate in ``benchmarks/results/lora_smollm2.json`` (a fine-tune already
there with the same command is skipped; ``--force`` reruns it) and the table between the
``lora-table`` markers in ``benchmarks/README.md`` is regenerated from that file.

    .venv/bin/python benchmarks/lora.py --dry-run          # print the commands only
    .venv/bin/python benchmarks/lora.py                    # 0.7 and 2:4, default steps
    .venv/bin/python benchmarks/lora.py --steps 96 --lr 3e-4 --settings 0.7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quality import METHODS, setting_args

from common import BENCH_README as README
from common import (
    RESULTS_DIR,
    load_results,
    parse_in_root,
    protocol_arguments,
    replace_block,
    run_d2prune,
    save_results,
    shown,
)

RESULTS = RESULTS_DIR / "lora_smollm2.json"
RUNS = Path("runs") / "lora"  # relative to the project root, so the recorded commands are short
MARK_BEGIN = "<!-- lora-table:begin -->"
MARK_END = "<!-- lora-table:end -->"


def prune_args(a: argparse.Namespace, setting: str, model_dir: Path) -> list[str]:
    return [
        "prune",
        a.model,
        *METHODS["d2prune"],
        *setting_args(setting),
        "--nsamples",
        str(a.nsamples),
        "--calib",
        "c4",
        "--seed",
        "0",
        "--seqlen",
        str(a.seqlen),
        "--eval",
        "wikitext2",
        "--eval-windows",
        str(a.eval_windows),
        "--save-model",
        str(model_dir),
    ]


def finetune_args(a: argparse.Namespace, model_dir: Path) -> list[str]:
    # One epoch over exactly steps × effective-batch blocks: every block is seen once.
    return [
        "finetune",
        str(model_dir),
        "--data",
        "c4",
        "--block-size",
        str(a.block_size),
        "--max-train-samples",
        str(a.steps * a.effective_batch_size),
        "--epochs",
        "1",
        "--batch-size",
        str(a.batch_size),
        "--effective-batch-size",
        str(a.effective_batch_size),
        "--lr",
        str(a.lr),
        "--warmup-steps",
        str(a.warmup_steps),
        "--lora-r",
        "8",
        "--lora-alpha",
        "16",
        "--lora-dropout",
        "0.05",
        "--lora-targets",
        "q_proj,v_proj",
        "--seed",
        "0",
        "--save-steps",
        "8",
        "--seqlen",
        str(a.seqlen),
        "--eval",
        "wikitext2",
        "--eval-windows",
        str(a.eval_windows),
    ]


def summarize(setting: str, pruned: dict, tuned: dict) -> dict:
    p, t = pruned["record"], tuned["record"]
    ft = t["finetune"]
    return {
        "name": f"d2prune-{setting}-lr{ft['config']['lr']:g}-steps{ft['steps']}",
        "setting": setting,
        "ppl_pruned": p["perplexity"]["pruned"]["wikitext2"]["ppl"],
        "ppl_finetuned": t["perplexity"]["finetuned"]["wikitext2"]["ppl"],
        "eval_windows": t["perplexity"]["finetuned"]["wikitext2"]["n_windows"],
        "sparsity_pruned": p["overall_sparsity"],
        "sparsity_before": t["sparsity"]["before"],
        "sparsity_after": t["sparsity"]["after"],
        "zeros_before": t["sparsity"]["zeros_before"],
        "zeros_after": t["sparsity"]["zeros_after"],
        "steps": ft["steps"],
        "effective_batch_size": ft["config"]["effective_batch_size"],
        "block_size": ft["block_size"],
        "lr": ft["config"]["lr"],
        "tokens_seen": ft["tokens_seen"],
        "first_loss": t["loss_curve"][0]["loss"],
        "last_loss": t["loss_curve"][-1]["loss"],
        "train_s": ft["train_seconds"],
        "finetune_wall_s": tuned["wall_s"],
        "finetune_peak_rss_mb": tuned["peak_rss_mb"],
        "prune_wall_s": pruned["wall_s"],
        "prune_command": pruned["command"],
        "command": tuned["command"],
        "loss_curve": t["loss_curve"],
    }


def write_table(rows: list[dict], readme: Path) -> None:
    lines = [
        "| setting | pruned ppl | after LoRA | change | steps × blocks | tokens seen | lr | first → last loss "
        "| train s | fine-tune wall s | zeros before = after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        label = r["setting"] if ":" in r["setting"] else f"{float(r['setting']):.0%}"
        change = (r["ppl_finetuned"] - r["ppl_pruned"]) / r["ppl_pruned"]
        same = "yes" if r["zeros_before"] == r["zeros_after"] else "**no**"
        lines.append(
            f"| {label} | {r['ppl_pruned']:.2f} | {r['ppl_finetuned']:.2f} | {change:+.1%} "
            f"| {r['steps']} × {r['effective_batch_size']} | {r['tokens_seen']:,} | {r['lr']:g} "
            f"| {r['first_loss']:.3f} → {r['last_loss']:.3f} | {r['train_s']:.0f} | {r['finetune_wall_s']:.0f} "
            f"| {same} ({r['sparsity_after']:.4f}) |"
        )
    replace_block(readme, MARK_BEGIN, MARK_END, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["0.7", "2:4"], help="sparsities or N:M patterns")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps of the fine-tune (default 48)")
    ap.add_argument("--effective-batch-size", type=int, default=4, help="blocks per optimizer step (default 4)")
    ap.add_argument("--batch-size", type=int, default=1, help="blocks per forward (default 1)")
    ap.add_argument("--block-size", type=int, default=512, help="tokens per training block (default 512)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4, the recipe's)")
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--force", action="store_true", help="rerun fine-tunes already in the results file")
    protocol_arguments(ap, RESULTS, README, RUNS)
    a = parse_in_root(ap, RUNS)
    if a.table_only:
        write_table(load_results(a.results), a.readme)
        return

    results = json.loads(a.results.read_text()) if a.results.exists() else []
    for setting in a.settings:
        base = a.runs_dir / f"d2prune-{setting}"
        model_dir = base / "model"
        # One folder per fine-tune schedule, so runs with other steps or lr keep their models.
        tuned_dir = base / f"finetune-{a.steps}x{a.effective_batch_size}x{a.block_size}-lr{a.lr:g}"
        p_args, f_args = prune_args(a, setting, model_dir), finetune_args(a, model_dir)
        print(f"[{setting}] {shown(p_args)} --output-dir {base / 'prune'}")
        print(f"[{setting}] {shown(f_args)} --output-dir {tuned_dir}", flush=True)
        if a.dry_run:
            continue
        if not a.force and any(r["command"] == shown(f_args) for r in results):
            print(f"skip {setting} (already measured)")
            continue
        # The pruned model is reused when the same prune command already saved it.
        prune_record = base / "prune" / "run.json"
        pruned = None
        if prune_record.exists() and (model_dir / "sparsity.json").exists():
            previous = json.loads(prune_record.read_text())
            if previous.get("pruned_by") == shown(p_args):
                pruned = {"command": shown(p_args), "wall_s": previous["wall_s"], "record": previous}
                print(f"[{setting}] reusing the pruned model in {model_dir}")
        if pruned is None:
            pruned = run_d2prune(f"prune-{setting}", p_args, base / "prune")
            prune_record.write_text(
                json.dumps({**pruned["record"], "pruned_by": shown(p_args), "wall_s": pruned["wall_s"]}, indent=2)
                + "\n"
            )
        tuned = run_d2prune(f"finetune-{setting}", f_args, tuned_dir)
        row = summarize(setting, pruned, tuned)
        print(
            f"[{setting}] ppl {row['ppl_pruned']:.2f} -> {row['ppl_finetuned']:.2f} after {row['steps']} steps "
            f"({row['tokens_seen']:,} tokens, {row['train_s']:.0f} s); zeros {row['zeros_before']} -> "
            f"{row['zeros_after']}",
            flush=True,
        )
        results = [r for r in results if r["command"] != row["command"]] + [row]
        save_results(a.results, results)
        write_table(results, a.readme)
    if results and not a.dry_run:
        write_table(results, a.readme)


if __name__ == "__main__":
    main()
