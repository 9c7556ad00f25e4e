"""Zero-shot cost: the tokens a full-set pass runs on SmolLM2-135M, and the time it takes here.

Step 1 (counting, no model forwards): every request of the eight tasks at full size goes through the
same path as ``d2prune eval --zero-shot`` (lm-eval's task building and tokenisation, then the
shared-context packing of ``evaluation.shared_context``), with the scoring forward replaced by a
recorder. Per task: items, requests, packed sequences, tokens run with shared contexts, and the
tokens lm-eval's own scoring would run.

Step 2 (timing): the packed sequences of each task are batched as the scorer batches them (longest
first, ``--batch-size`` per forward), and one batch in ``--every`` (a systematic sample over the
length order) is scored by the real forward; the sampled time times ``--every`` estimates the
forward time of the task. Everything else a pass spends (task building, tokenisation, which step 1
times) is added as measured. The total is an *estimate* from a 1-in-``every`` sample of forwards and
is labelled so in the table.

    .venv/bin/python benchmarks/zeroshot_cost.py [--every 25] [--batch-size 8]

Needs the machine to itself for step 2 (the timing). Results: ``benchmarks/results/zeroshot_cost.json``
and a table in ``benchmarks/README.md`` (zero-shot section).
"""

from __future__ import annotations

import argparse
import platform
import time

from common import BENCH_README, RESULTS_DIR, replace_block, save_results

RESULTS = RESULTS_DIR / "zeroshot_cost.json"
MARK_BEGIN, MARK_END = "<!-- zeroshot-cost:begin -->", "<!-- zeroshot-cost:end -->"
TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa"]
MODEL = "smollm2-135m"


def recording_lm(shared_context_lm):
    """A factory like ``shared_context_lm`` whose LM records its packed sequences instead of scoring them."""
    made = []

    def factory(base):
        scoring_cls = shared_context_lm(base)

        class RecordingLM(scoring_cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.recorded: list[dict] = []
                made.append(self)

            def _check(self, piece, requests):
                self.sharing["checked"] = {"skipped": "counting only"}
                return self._score([piece[1]])[0]

            def _score(self, packs):
                self.recorded += packs
                return [[(0.0, False)] * len(p["continuations"]) for p in packs]

            def score_for_real(self, packs):
                return scoring_cls._score(self, packs)

        return RecordingLM

    return factory, made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=int, default=25, help="time one batch in this many (default 25)")
    ap.add_argument("--batch-size", type=int, default=8, help="packed sequences per forward (default 8)")
    args = ap.parse_args()

    import torch

    import d2prune.evaluation.shared_context as shared_context
    from d2prune.evaluation.zeroshot import run_zero_shot
    from d2prune.io.models import load_model

    model, tokenizer = load_model(MODEL)
    factory, made = recording_lm(shared_context.shared_context_lm)
    shared_context.shared_context_lm = factory  # run_zero_shot imports it at call time
    rows = []
    for task in TASKS:
        start = time.perf_counter()
        result = run_zero_shot(model, tokenizer, tasks=task, batch_size=args.batch_size)
        overhead_s = time.perf_counter() - start  # task building + tokenisation: no forward ran
        lm = made[-1]
        packs = sorted(lm.recorded, key=lambda p: -len(p["ids"]))
        # The recorder stands in for the scorer's private steps: fail loudly if those have moved.
        if sum(len(p["ids"]) for p in packs) != lm.sharing["tokens_run"] or len(packs) != lm.sharing["contexts"]:
            raise SystemExit("zeroshot_cost: the recorded packs disagree with the scorer's own counts")
        batches = [packs[i : i + args.batch_size] for i in range(0, len(packs), args.batch_size)]
        sample = batches[args.every // 2 :: args.every] or batches[:1]
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in sample:
                lm.score_for_real(batch)
        sampled_s = time.perf_counter() - t0
        sampled_tokens = sum(len(p["ids"]) for b in sample for p in b)
        forward_s = sampled_s * len(batches) / len(sample)
        row = {
            "task": task,
            "items": result[task]["n"],
            **{k: lm.sharing[k] for k in ("requests", "contexts", "tokens_run", "tokens_lm_eval")},
            "forwards": len(batches),
            "timed_forwards": len(sample),
            "timed_tokens": sampled_tokens,
            "timed_s": round(sampled_s, 2),
            "tokens_per_s": round(sampled_tokens / sampled_s, 1),
            "forward_s_estimate": round(forward_s, 1),
            "overhead_s": round(overhead_s, 1),
        }
        print(row, flush=True)
        rows.append(row)
    meta = {
        "model": MODEL,
        "batch_size": args.batch_size,
        "every": args.every,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "command": f".venv/bin/python benchmarks/zeroshot_cost.py --every {args.every} --batch-size {args.batch_size}",
        "date": time.strftime("%Y-%m-%d"),
    }
    save_results(RESULTS, [meta, *rows])
    write_table(meta, rows)


def write_table(meta: dict, rows: list[dict]) -> None:
    lines = [
        "| task | items | requests | packed sequences | tokens run | tokens with lm-eval's scoring | "
        "forward tok/s (timed sample) | forwards, est. (s) | task building + tokenising (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = {k: sum(r[k] for r in rows) for k in ("items", "requests", "contexts", "tokens_run", "tokens_lm_eval")}
    fwd = sum(r["forward_s_estimate"] for r in rows)
    over = sum(r["overhead_s"] for r in rows)
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['items']:,} | {r['requests']:,} | {r['contexts']:,} | {r['tokens_run']:,} | "
            f"{r['tokens_lm_eval']:,} | {r['tokens_per_s']:.0f} | {r['forward_s_estimate']:,.0f} | {r['overhead_s']:.0f} |"
        )
    lines.append(
        f"| **all** | {total['items']:,} | {total['requests']:,} | {total['contexts']:,} | {total['tokens_run']:,} | "
        f"{total['tokens_lm_eval']:,} | {total['tokens_run'] / fwd:.0f} | {fwd:,.0f} | {over:.0f} |"
    )
    lines += [
        "",
        f"Estimated full-set pass for one model: **{(fwd + over) / 3600:.1f} h** ({fwd / 60:.0f} min of forwards, "
        f"scaled from 1 in {meta['every']} batches timed, plus {over / 60:.0f} min measured for task building and "
        f"tokenising); shared contexts run {total['tokens_run'] / total['tokens_lm_eval']:.2f}× lm-eval's tokens. "
        f"{meta['model']}, float32, batch {meta['batch_size']}, {meta['threads']} threads, torch {meta['torch']}, "
        f"{meta['date']}; `{meta['command']}`.",
    ]
    replace_block(BENCH_README, MARK_BEGIN, MARK_END, "\n".join(lines), append=False)


if __name__ == "__main__":
    main()
