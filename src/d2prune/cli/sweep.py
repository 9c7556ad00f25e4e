"""``d2prune sweep``: many ``d2prune prune`` runs over a grid, on one loaded model.

The grid is methods (or named variants: a name for a set of prune options) × settings (the
unstructured sparsities, and the N:M patterns) × the optional OWL, refit and compute-dtype axes. The
model, its tokenizer, the calibration windows and the evaluation tokens are read once; the dense
weights are kept in memory and copied back before every cell, and the dense perplexity is measured
once (and kept in ``OUT/dense_perplexity.json`` for a rerun). Each cell writes ``OUT/cells/<cell>/run.json`` (atomically, last) with the same content as
``d2prune prune``'s, plus ``sweep_cell``: its name and the equivalent ``d2prune prune`` arguments. A
rerun skips the cells whose run record exists with the same arguments; a record with other arguments
is an error (the folder holds another experiment). The report (``sweep_report``) is written once
every cell is done. A held-out search within a cell resumes candidate by candidate (``selection``).
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2prune.cli import common, prune, vision
from d2prune.cli.options import Parser, pattern
from d2prune.errors import UserError

# The prune options the grid replaces (the axes) or that a sweep cannot take (--resume streams).
REPLACED = ("method", "sparsity", "pattern", "prune_n", "prune_m", "refit", "compute_dtype", "resume", "eval_dense")
AXES = ("methods", "variants", "sparsities", "patterns", "owl", "refits", "compute_dtypes")
# Options that do not change a cell's result, left out of its equivalent ``d2prune prune`` command.
NOT_IDENTITY = ("output_dir", "no_progress", "dist_timeout", "model_opt")
DENSE_CACHE = "dense_perplexity.json"  # in the output folder: the dense model's perplexity, for a rerun
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser(
        "sweep",
        help="prune and evaluate a grid of methods and settings on one loaded model, with a report",
        description="Every cell is the `d2prune prune` run of its method and setting (the other options "
        "apply to all cells); OUT/cells/CELL/run.json per cell, OUT/report.md, OUT/ppl_vs_sparsity.png "
        "and OUT/sweep.json at the end. Rerunning the command skips the finished cells.",
    )
    prune.add_prune_options(sw)
    for action in [a for a in sw._actions if a.dest in REPLACED]:
        _drop(sw, action)
    g = sw.add_argument_group("grid (one cell per combination; the other options apply to every cell)")
    g.add_argument(
        "--methods",
        "--method",
        dest="methods",
        nargs="+",
        default=None,
        help="method names or --variant names (default: the variants, else the default method)",
    )
    g.add_argument(
        "--variant",
        dest="variants",
        action="append",
        default=[],
        metavar='NAME="OPTIONS"',
        help="a named method variant: prune options for its cells, e.g. "
        'd2prune-v="--method d2prune --target-layers self_attn.v_proj" (repeatable)',
    )
    g.add_argument("--sparsities", "--sparsity", dest="sparsities", nargs="+", type=float, default=[0.5])
    g.add_argument(
        "--patterns",
        "--pattern",
        dest="patterns",
        nargs="+",
        default=["unstructured"],
        help="unstructured (one cell per sparsity) and/or N:M patterns (default unstructured)",
    )
    g.add_argument("--owl", nargs="+", choices=["off", "on"], default=None, help="OWL layer-wise sparsity off/on")
    g.add_argument("--refit", dest="refits", nargs="+", choices=["none", "cg"], default=None, help="refit none/cg")
    g.add_argument(
        "--compute-dtypes", "--compute-dtype", dest="compute_dtypes", nargs="+", default=None, help="forward dtypes"
    )


def _drop(parser: argparse.ArgumentParser, action: argparse.Action) -> None:
    """Remove an option the grid replaces, with all its spellings."""
    parser._remove_action(action)
    for group in parser._action_groups:
        if action in group._group_actions:
            group._group_actions.remove(action)
    for flag in action.option_strings:
        parser._option_string_actions.pop(flag, None)


class _CellParser(Parser):
    """``d2prune prune``'s options, parsing one cell; a mistake names the cell."""

    cell = ""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.cell}: {message}")


def cell_parser() -> _CellParser:
    parser = _CellParser(prog="d2prune prune", add_help=False)
    prune.add_prune_options(parser)
    return parser


@dataclass
class Cell:
    """One prune run of the grid."""

    name: str
    variant: str  # the method variant (a plot line: the name without the setting)
    args: argparse.Namespace
    argv: list[str]  # the equivalent ``d2prune prune`` arguments
    skipped: str | None = None

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_")  # N:M names stay portable folder names


def variants(specs: list[str]) -> dict[str, list[str]]:
    """``--variant NAME="OPTIONS"`` as name → prune arguments."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, options = spec.partition("=")
        name = name.strip()
        if not sep or not NAME.match(name):
            raise UserError(f'--variant takes NAME="OPTIONS" (NAME of letters, digits, ._+-), got {spec!r}')
        if name in out:
            raise UserError(f"--variant {name} is given twice")
        try:
            out[name] = shlex.split(options)
        except ValueError as e:
            raise UserError(f"--variant {name}: {e}") from None
    return out


def settings(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, prune arguments) per setting: each sparsity for unstructured, then each N:M pattern."""
    out: list[tuple[str, list[str]]] = []
    for p in dict.fromkeys(args.patterns):
        if p == "unstructured":
            out += [(f"{s:g}", ["--sparsity", f"{s:g}"]) for s in dict.fromkeys(args.sparsities)]
        elif re.fullmatch(r"\d+:\d+", p):
            out.append((p, ["--pattern", p]))
        else:
            raise UserError(f"unknown pattern {p!r} in --patterns: unstructured or N:M (e.g. 2:4)")
    return out


def axis(values: list[str] | None, flag: str, suffix) -> list[tuple[str, list[str]]]:
    """(name suffix, prune arguments) per value of an optional axis; [("", [])] when not given."""
    if not values:
        return [("", [])]
    return [(suffix(v), [flag, v]) for v in dict.fromkeys(values)]


def build_grid(args: argparse.Namespace) -> list[Cell]:
    """Every cell, parsed and checked (a mistake in any cell stops the sweep before the model loads)."""
    from d2prune.cli.method_options import default_method
    from d2prune.methods import METHODS

    named = variants(args.variants)
    names = args.methods or list(named) or [default_method()]
    for name in names:
        if name not in named and name.lower() not in METHODS:
            raise UserError(
                f"unknown method or variant {name!r} in --methods: choose one of {', '.join(sorted(METHODS))} "
                f"or a --variant name"
            )
    owl = axis(["uniform" if v == "off" else "owl" for v in args.owl or []], "--sparsity-profile", _owl_suffix)
    refits = axis(args.refits, "--refit", lambda v: "" if v == "none" else f"-refit-{v}")
    dtypes = axis(args.compute_dtypes, "--compute-dtype", lambda v: "" if v == "model" else f"-{v}")
    base = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in (*AXES, "command")})
    parser = cell_parser()
    parser.cell = "the shared options"
    shared = parser.parse_args([], copy.copy(base))
    cells: dict[str, Cell] = {}
    for label, setting in settings(args):
        for name in dict.fromkeys(names):
            for o_sfx, o_args in owl:
                for r_sfx, r_args in refits:
                    for d_sfx, d_args in dtypes:
                        variant = name + o_sfx + r_sfx + d_sfx
                        cell_name = f"{variant}-{label}"
                        options = named.get(name, ["--method", name])
                        parser.cell = f"cell {cell_name}"
                        own = [*options, *setting, *o_args, *r_args, *d_args]
                        ns = parser.parse_args(own, copy.copy(base))
                        # The model positional is parsed again (to None): a value there is a stray word.
                        if ns.model is not None:
                            raise UserError(f"--variant {name}: {ns.model!r} is not an option")
                        ns.model = base.model
                        if cell_name in cells:
                            raise UserError(f"two cells are named {cell_name}: give the variants other names")
                        argv = [str(base.model), *own, *prune_argv(parser, ns, shared)]
                        cells[cell_name] = Cell(cell_name, variant, ns, argv)
    for cell in cells.values():
        if cell.args.sparsity_profile == "owl" and ":" in pattern(cell.args):
            cell.skipped = "OWL has no N:M form"
            continue
        try:
            if cell.args.save_model not in (None, True):
                raise UserError("--save-model saves each cell's model in its folder: give it without a path")
            prune.prune_config(cell.args, Path(args.output_dir or ".") / "cells" / cell.folder, streamed=False)
        except UserError as e:
            raise UserError(f"cell {cell.name}: {e}") from None
    return list(cells.values())


def _owl_suffix(value: str) -> str:
    return "-owl" if value == "owl" else ""


def prune_argv(parser: argparse.ArgumentParser, ns: argparse.Namespace, shared: argparse.Namespace) -> list[str]:
    """The shared options of a cell's ``d2prune prune`` command: each one not at its default that
    the cell's own options (its variant and axes) leave as the sweep has it."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_IDENTITY or action.default == argparse.SUPPRESS:
            continue
        value = getattr(ns, action.dest, action.default)
        if value == action.default or value != getattr(shared, action.dest, action.default):
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        elif value is True:  # an optional value given bare (--save-model)
            out.append(flag)
        else:
            out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    from d2prune.cli import sweep_report

    if not args.output_dir:
        raise UserError("d2prune sweep needs --output-dir (each cell's run record and the report go there)")
    common.check_model_options(args)
    common.check_data_options(args)
    out = Path(args.output_dir)
    cells = build_grid(args)
    done = {c.name: finished(c, out) for c in cells if not c.skipped}
    todo = [c for c in cells if not c.skipped and done[c.name] is None]
    print(
        f"sweep: {len(cells)} cells, {len(cells) - len(todo)} done or skipped, {len(todo)} to run; output {out}",
        flush=True,
    )
    if todo:
        for name in sweep_report.OUTPUTS:  # a report is only ever that of a finished grid
            (out / name).unlink(missing_ok=True)
        args.interrupt_hint = f"the finished cells are kept in {out / 'cells'}; rerun the same command to continue"
        for cell, record in zip(todo, Session(args, out).run(todo)):
            done[cell.name] = record
        args.interrupt_hint = None
    report = sweep_report.write(out, grid(args), cells, done)
    print(report)
    return 0


def grid(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in AXES} | {"model": args.model}


def finished(cell: Cell, out: Path) -> dict | None:
    """The cell's run record if it ran with the same arguments; an error if it ran with others."""
    import json

    path = out / "cells" / cell.folder / "run.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    before = record.get("sweep_cell", {}).get("argv")
    if before != cell.argv:
        raise UserError(
            f"{path} holds a run of other options ({shown(before or [])!r}, not {shown(cell.argv)!r}): "
            f"remove that folder to rerun the cell, or use another --output-dir"
        )
    return record


def shown(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in ["d2prune", "prune", *argv])


class Session:
    """The model, tokenizer, dense weights, calibration and evaluation tokens shared by the cells."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.offload = common.offload_policy(args)
        if self.offload["weights"] == "disk":
            raise UserError(
                "d2prune sweep keeps the model in memory (it restores the dense weights between cells): "
                "use --offload none, or d2prune prune --offload disk per cell"
            )
        self.timings: dict[str, float] = {}
        self.model, self.tokenizer = common.load(args, False, self.timings)
        # The cheap way back to the dense model: a copy of every weight, copied back before each cell.
        self.dense = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.calibration: dict[tuple, Any] = {}
        self.eval_tokens: dict[str, Any] = {}
        self.dense_ppl: dict[str, dict] = self._read_dense_cache()
        self.dense_cached = set(self.dense_ppl)  # measured by an earlier run of the sweep

    def _read_dense_cache(self) -> dict[str, dict]:
        """The dense perplexities an earlier run of this sweep measured (``dense_perplexity.json``):
        a resumed sweep of the full protocol would otherwise spend ~25 min measuring it again."""
        import json

        try:
            cached = json.loads((self.out / DENSE_CACHE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in cached.items() if isinstance(v, dict)} if isinstance(cached, dict) else {}

    def run(self, cells: list[Cell]):
        """Run the cells in order under one progress bar; yields each finished cell's run record."""
        from tqdm.auto import tqdm

        with tqdm(total=len(cells), desc="sweep", unit="cell", disable=self.args.no_progress) as bar:
            for cell in cells:
                bar.set_postfix_str(cell.name)
                yield self.run_cell(cell)
                bar.update()

    def restore(self) -> None:
        self.model.load_state_dict(self.dense)
        self.model.zero_grad(set_to_none=True)  # a method's gradient pass leaves nothing behind

    def run_cell(self, cell: Cell) -> dict:
        from d2prune.io.atomic import write_json_atomic

        ns = copy.copy(cell.args)
        ns.no_progress = True  # the grid's bar is the one progress bar
        ns.eval_tokens = self.eval_tokens
        common.check_model_options(ns)
        common.check_data_options(ns)
        folder = self.out / "cells" / cell.folder
        record = common.new_record(ns, self.offload)
        record["command"] = shown(cell.argv)
        record["sweep_cell"] = {"name": cell.name, "variant": cell.variant, "argv": cell.argv}
        config = prune.prune_config(ns, folder, streamed=False)
        ns.vision = self.args.vision
        if ns.vision:
            vision.check_options(ns, config)
        else:
            vision.check_images_only(ns)
            common.window_bos(ns, self.model, self.tokenizer, record)
        calib_source = ns.calib_data_path or ns.calib
        timings: dict[str, float] = {}
        key = (calib_source, ns.nsamples, ns.seqlen, ns.seed, str(ns.data_dir_path))
        if key not in self.calibration:
            self.calibration[key] = prune.read_calibration(ns, self.model, self.tokenizer, calib_source, timings)
        ppl = {"dense": self.dense_perplexity(ns)} if any(e.lower() != "none" for e in ns.eval) else {}
        self.restore()
        ns.heldout_progress = (folder / "heldout-progress", record["command"])  # a held-out search resumes
        record, _ = prune.prune_and_record(
            ns, self.model, self.tokenizer, self.calibration[key], config, calib_source, folder, record, timings, ppl
        )
        record["sweep_shared_timings"] = self.timings  # the model load and the dense evaluations, done once
        if ppl and self.dense_key(ns) in self.dense_cached:
            record["sweep_dense_perplexity"] = f"measured by an earlier run of this sweep ({DENSE_CACHE})"
        write_json_atomic(folder / "run.json", record)
        shutil.rmtree(folder / "heldout-progress", ignore_errors=True)
        return record

    def dense_perplexity(self, ns: argparse.Namespace) -> dict:
        """The dense model's perplexity under the cell's evaluation options, measured once per distinct options."""
        from d2prune.io.atomic import write_json_atomic

        key = self.dense_key(ns)
        if key not in self.dense_ppl:
            self.restore()
            t0 = time.perf_counter()
            ppl: dict[str, dict] = {}
            common.evaluate(self.model, self.tokenizer, ns, "dense", ppl)
            self.timings["eval_dense"] = self.timings.get("eval_dense", 0.0) + time.perf_counter() - t0
            self.dense_ppl[key] = ppl["dense"]
            write_json_atomic(self.out / DENSE_CACHE, self.dense_ppl)
        return self.dense_ppl[key]

    @staticmethod
    def dense_key(ns: argparse.Namespace) -> str:
        """Everything the dense perplexity depends on: the model as loaded and the evaluation."""
        options = ("model", "dtype", "device", "data_dir_path", "bos", "eval", "eval_data_path", "seqlen")
        options += ("eval_windows", "eval_batch_size")
        values = [str(ns.data_dir_path) if k == "data_dir_path" else getattr(ns, k, None) for k in options]
        return repr((*values, ns.compute.name(None)))
