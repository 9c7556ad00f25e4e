"""Memory scaling of streamed pruning: peak RSS of ``d2prune prune --offload disk`` vs model size.

For each size, a synthetic LLaMA checkpoint with random weights (fp16 safetensors, one shard per
decoder layer, the tokenizer of the shared tiny LLaMA) is written to a temporary folder, pruned with
SparseGPT at 50% by a ``d2prune`` subprocess (peak RSS from ``os.wait4``), and deleted with its
output. Every size uses the same calibration (C4 windows, seed 0). Results go to
``benchmarks/results/memory.json`` and the table in ``benchmarks/README.md``.

The goal (issue #6): peak RSS grows with the layer size, not the model size; the 2B run peaks below
half the checkpoint's size on disk plus the activation cache.

    .venv/bin/python benchmarks/memory.py                         # tiny 0.25B 0.5B 1B 2B
    .venv/bin/python benchmarks/memory.py --sizes tiny --nsamples 4 --seqlen 64 --no-readme   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import Launcher, replace_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"
README = ROOT / "benchmarks" / "README.md"
MARK_BEGIN = "<!-- memory-table:begin -->"
MARK_END = "<!-- memory-table:end -->"
TOKENIZER = ROOT.parent / "shared" / "models" / "aidreams260K"

# LLaMA shapes (vocab 32000, untied head, full multi-head attention, head dim 128 where it divides).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4),
    "0.25B": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=8),
    "0.5B": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12),
    "1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16),
    "2B": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=24, num_attention_heads=20),
}


def llama_config(size: str):
    from transformers import LlamaConfig

    shape = SIZES[size]
    return LlamaConfig(
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        num_key_value_heads=shape["num_attention_heads"],
        dtype="float16",
        **shape,
    )


def write_checkpoint(size: str, folder: Path, seed: int = 0) -> dict:
    """A random fp16 LLaMA checkpoint, written one decoder layer at a time (never the whole model
    in memory). Weights ~ N(0, 0.02²) as in HF's init; norms are ones."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = llama_config(size)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    params = dict(model.named_parameters())
    layers = config.num_hidden_layers
    groups: list[list[str]] = [[n for n in params if ".layers." not in n]]
    groups += [[n for n in params if f".layers.{i}." in n] for i in range(layers)]
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = params[name].shape
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        del tensors
    total = sum(params[n].numel() * 2 for n in params)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, folder / f)
    layer_params = sum(params[n].numel() for n in groups[1])
    return {
        "params": sum(p.numel() for p in params.values()),
        "layer_params": layer_params,
        "layers": layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "checkpoint_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
    }


def run_prune(ckpt: Path, out: Path, args: argparse.Namespace, launcher: Launcher) -> dict:
    """One ``d2prune prune --offload disk`` process: wall time, peak RSS and its run record."""
    cmd = [
        sys.executable,
        "-m",
        "d2prune",
        "prune",
        str(ckpt),
        "--method",
        args.method,
        "--sparsity",
        "0.5",
        "--offload",
        "disk",
        "--activation-offload",
        args.activation_offload,
        "--dtype",
        args.dtype,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--calib",
        "c4",
        "--seed",
        "0",
        "--eval",
        "none",
        "--no-measure-error",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    res = launcher.run(cmd, env)
    if res["returncode"] != 0:
        raise SystemExit(f"{ckpt.name} failed:\n{res['output']}")
    record = json.loads((out / "run.json").read_text())
    shown = " ".join(shlex.quote(a) for a in ["d2prune", *cmd[3:]]).replace(str(ckpt), "CKPT").replace(str(out), "OUT")
    return {
        "command": shown,
        "wall_s": res["wall_s"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "activation_bytes": record["activations"]["bytes"],
        "activation_storage": record["activations"]["storage"],
        "prune_timings": record["prune_timings"],
        "overall_sparsity": record["overall_sparsity"],
        "output_bytes": sum(p.stat().st_size for p in (out / "model").glob("*.safetensors")),
    }


def measure(size: str, args: argparse.Namespace, workdir: Path, launcher: Launcher) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"memory-{size}-", dir=workdir))
    try:
        t0 = time.perf_counter()
        info = write_checkpoint(size, folder / "ckpt")
        info["write_s"] = time.perf_counter() - t0
        print(
            f"{size}: {info['params'] / 1e9:.3f}B params, checkpoint {info['checkpoint_bytes'] / 2**30:.2f} GiB "
            f"({info['write_s']:.0f} s to write); pruning ...",
            flush=True,
        )
        result = run_prune(folder / "ckpt", folder / "out", args, launcher)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    bound = info["checkpoint_bytes"] / 2 + result["activation_bytes"]
    row = {"size": size, **info, **result, "bound_bytes": bound, "within_goal": result["peak_rss_bytes"] < bound}
    print(
        f"{size}: peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB, "
        f"wall {row['wall_s']:.0f} s",
        flush=True,
    )
    return row


def table(results: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"
    lines = [
        f"SparseGPT 50%, calibration {results['nsamples']}×{results['seqlen']} C4 tokens (seed 0), compute dtype "
        f"{results['dtype']}, activations: {results['activation_offload']}; machine: {results['machine']}.",
        "",
        "| size | params | layers | params / layer | checkpoint (MiB, fp16) | activations (MiB) | peak RSS (MiB) "
        "| goal: < ckpt/2 + activations (MiB) | met | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e9:.3f}B | {r['layers']} | {r['layer_params'] / 1e6:.1f}M "
            f"| {mib(r['checkpoint_bytes'])} | {mib(r['activation_bytes'])} | {mib(r['peak_rss_bytes'])} "
            f"| {mib(r['bound_bytes'])} | {'yes' if r['within_goal'] else 'no'} | {r['wall_s']:.0f} |"
        )
    lines += ["", f"Command of each run: `{results['runs'][0]['command']}`" if results["runs"] else ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "0.25B", "0.5B", "1B", "2B"], choices=list(SIZES))
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--method", default="sparsegpt")
    # A 16-bit checkpoint is pruned in a 16-bit compute dtype (fp32 would double the layer and the
    # activations); bfloat16 because this CPU has bf16 matmuls and fp16 ones are 4x slower.
    p.add_argument("--dtype", default="bfloat16", help="compute dtype of d2prune (default bfloat16)")
    p.add_argument("--activation-offload", default="auto", help="ram | disk | auto (default auto)")
    p.add_argument("--workdir", default=None, help="where the checkpoints are written (default: system temp)")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--no-readme", action="store_true", help="do not touch benchmarks/README.md")
    args = p.parse_args()
    launcher = Launcher()  # before this process grows (see common.py)

    import platform

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM, {platform.machine()}"
    results = {
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "method": args.method,
        "dtype": args.dtype,
        "activation_offload": args.activation_offload,
        "machine": machine,
        "command": " ".join(["python", "benchmarks/memory.py", *sys.argv[1:]]),
        "runs": [],
    }
    for size in args.sizes:
        results["runs"].append(measure(size, args, workdir, launcher))
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    launcher.close()
    text = table(results)
    print(text)
    if not args.no_readme:
        replace_block(README, MARK_BEGIN, MARK_END, text)


if __name__ == "__main__":
    main()
