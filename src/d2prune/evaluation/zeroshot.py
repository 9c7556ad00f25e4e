"""Zero-shot accuracy through lm-evaluation-harness (0.4.x), on the model already in memory.

Protocol of the D²Prune paper (lm-eval 0.4.4 there): tasks boolq, rte, hellaswag, winogrande,
arc_easy, arc_challenge and openbookqa, 0-shot; per task ``acc_norm`` where the task has it, else
``acc``; the reported score is the plain mean of the seven. piqa is available as an extra task.

Offline (the default) every task reads its data from the data folder (``<data_dir>/<task>/``, see
``d2prune.evaluation.tasks.convert.LOCAL_TASKS``) through lm-eval task configs that include lm-eval's own
config for the task (``d2prune.evaluation.tasks.configs``): same prompts, targets, metrics and task version,
only the data source differs. With ``offline=False`` a task without local data falls back to
lm-eval's standard, Hub-backed task.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from d2prune.engine.precision import as_dtype, computing_in
from d2prune.errors import UserError
from d2prune.evaluation.tasks.convert import LOCAL_TASKS, load_task_docs, missing_files

log = logging.getLogger(__name__)

#: All tasks this module runs; the first seven are the paper's.
TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
PAPER_TASKS = TASKS[:7]

#: The metric reported per task: acc_norm where lm-eval defines it, else acc.
METRICS = {
    "boolq": "acc",
    "rte": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "piqa": "acc_norm",
}


def lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        import lm_eval

        return getattr(lm_eval, "__version__", "unknown")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise UserError(f"zero-shot evaluation needs lm-eval 0.4.x (pip install lm-eval): {e}") from None


def _normalize_tasks(tasks: str | Iterable[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    aliases = {"all": list(TASKS), "paper": list(PAPER_TASKS)}
    out: list[str] = []
    for n in names:
        for m in aliases.get(n.lower(), [n.lower()]):
            if m not in TASKS:
                raise UserError(f"unknown zero-shot task {n!r}; known: {', '.join(TASKS)} (or 'paper', 'all')")
            if m not in out:
                out.append(m)
    if not out:
        raise UserError("no zero-shot task given")
    return out


@contextlib.contextmanager
def _preserved_state(model: torch.nn.Module, offline: bool):
    """Undo lm-eval's side effects: global RNG seeding, model.eval(), and (offline) allow no Hub access."""
    import numpy as np

    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    was_training = model.training
    env_keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old_env = {k: os.environ.get(k) for k in env_keys}
    patched: list[tuple[Any, str, Any]] = []
    if offline:
        for k in env_keys:
            os.environ[k] = "1"
        with contextlib.suppress(Exception):
            import datasets.config as dcfg

            for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
                if hasattr(dcfg, attr):
                    patched.append((dcfg, attr, getattr(dcfg, attr)))
                    setattr(dcfg, attr, True)
    try:
        yield
    finally:
        for obj, attr, value in patched:
            setattr(obj, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        model.train(was_training)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _metric_entry(task_results: dict, metric: str) -> tuple[float | None, float | None]:
    value = task_results.get(f"{metric},none")
    stderr = task_results.get(f"{metric}_stderr,none")
    as_float = (
        lambda v: float(v) if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)) else None
    )
    return as_float(value), as_float(stderr)


def _split_local_hub(names: list[str], data_dir: Path, offline: bool) -> tuple[list[str], list[str]]:
    """Tasks with local data, and (offline=False only) tasks left to lm-eval's Hub-backed version."""
    local, hub = [], []
    for name in names:
        if not missing_files(data_dir, name):
            local.append(name)
        elif offline:
            load_task_docs(data_dir, name)  # raises the UserError naming the folder and the files
        else:
            log.warning("zero-shot %s: no local data under %s, using lm-eval's Hub task", name, data_dir / name)
            hub.append(name)
    return local, hub


def _prepare_tasks(local: list[str], hub: list[str], data_dir: Path, folder: Path):
    """Write the local task configs under ``folder``; return (TaskManager, {lm-eval name: task}, {task: source})."""
    from lm_eval.tasks import TaskManager

    from d2prune.evaluation.tasks.configs import write_local_task

    run_names: dict[str, str] = {}  # lm-eval task name -> standard name
    sources: dict[str, str] = {}
    for name in local:
        write_local_task(name, load_task_docs(data_dir, name), folder)
        run_names[LOCAL_TASKS[name].local_name] = name
        sources[name] = str((data_dir / name).resolve())
    for name in hub:
        run_names[name] = name
        sources[name] = f"hub:{LOCAL_TASKS[name].hub}"
    include = str(folder / "tasks") if local else None
    return TaskManager(include_path=include, include_defaults=bool(hub)), run_names, sources


def local_lm_eval_tasks(tasks: str | Iterable[str], data_dir: str | Path | None, folder: str | Path) -> dict[str, Any]:
    """lm-eval ``Task`` objects of our local copies of ``tasks`` (configs and data written under ``folder``).

    For inspection and tests: ``task.eval_docs``, ``task.doc_to_text(doc)`` etc. are what
    ``run_zero_shot`` evaluates. The folder must outlive the tasks' use.
    """
    from d2prune.data import default_data_dir

    _require_lm_eval()
    names = _normalize_tasks(tasks)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    task_manager, run_names, _ = _prepare_tasks(names, [], data_dir, Path(folder))
    if hasattr(task_manager, "load"):  # lm-eval >= 0.4.10
        loaded = task_manager.load(list(run_names))["tasks"]
    else:
        from lm_eval.tasks import get_task_dict

        loaded = get_task_dict(list(run_names), task_manager)
    return {run_names[k]: v for k, v in loaded.items() if k in run_names}


def run_zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Iterable[str] = PAPER_TASKS,
    data_dir: str | Path | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | torch.device | None = None,
    offline: bool = True,
    add_bos_token: bool | None = None,
    compute_dtype: torch.dtype | str | None = None,
    share_contexts: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` (already loaded, evaluated where it is) with lm-evaluation-harness.

    ``tasks``: names from ``TASKS`` (a list or a comma-separated string; "paper" = the seven, "all").
    ``data_dir``: the folder holding ``<task>/<files>`` (default ``d2prune.data.default_data_dir()``).
    ``limit``: evaluate only the first ``limit`` items of each task (a float < 1: that fraction).
    ``device``: move the model there first; None leaves it where it is.
    ``offline``: True reads only local data (a missing task is a UserError); False lets a task whose
    local data is missing use lm-eval's standard Hub-backed task.
    ``add_bos_token``: passed to lm-eval's HFLM (None = the tokenizer's default; lm-eval 0.4.4, the
    paper's version, never added BOS for causal LMs, later versions follow the tokenizer).
    ``compute_dtype``: the dtype the forwards run in (``engine.precision``; None: the model's).
    ``share_contexts``: score the choices of an item with one forward of their shared context
    (``evaluation.shared_context``; same answers to rounding, checked on the first item); False:
    lm-eval's own scoring, one forward per choice.

    Returns ``{task: {"metric", "value", "stderr", "n", "acc", "acc_norm" (None where
    the task has none), "version", "source"}, ...,
    "mean": plain mean over the paper's tasks run, "mean_all": mean over all tasks run,
    "tasks": [names], "limit", "lm_eval_version"}``.
    """
    names = _normalize_tasks(tasks)
    _require_lm_eval()
    from d2prune.data import default_data_dir

    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()

    local, hub = _split_local_hub(names, data_dir, offline)

    if device is not None and torch.device(device) != next(model.parameters()).device:
        model.to(device)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    dtype = as_dtype(compute_dtype, next(model.parameters()).device)
    with (
        tempfile.TemporaryDirectory(prefix="d2prune_zeroshot_") as tmp,
        _preserved_state(model, offline),
        computing_in(model, dtype),
    ):
        task_manager, run_names, sources = _prepare_tasks(local, hub, data_dir, Path(tmp))
        hflm_kwargs: dict[str, Any] = {
            "pretrained": model,
            "tokenizer": copy.deepcopy(tokenizer),
            "batch_size": batch_size,
        }
        if add_bos_token is not None:
            hflm_kwargs["add_bos_token"] = add_bos_token
        from d2prune.evaluation.shared_context import shared_context_lm

        lm = shared_context_lm(HFLM)(share_contexts=share_contexts, **hflm_kwargs)
        out = simple_evaluate(
            model=lm,
            tasks=list(run_names),
            num_fewshot=0,
            limit=limit,
            task_manager=task_manager,
            log_samples=False,
        )

    if not out or "results" not in out:
        raise RuntimeError("lm-eval returned no results")
    result: dict[str, Any] = {}
    n_samples = out.get("n-samples", {})
    versions = out.get("versions", {})
    for run_name, name in run_names.items():
        res = out["results"].get(run_name)
        if res is None:
            raise RuntimeError(f"lm-eval returned no result for {run_name}")
        metric = "acc_norm" if _metric_entry(res, "acc_norm")[0] is not None else "acc"
        if metric != METRICS[name]:
            log.warning("zero-shot %s: lm-eval gives %s, the paper's protocol expects %s", name, metric, METRICS[name])
        value, stderr = _metric_entry(res, metric)
        counts = n_samples.get(run_name, {})
        entry = {
            "metric": metric,
            "value": value,
            "stderr": stderr,
            "n": int(counts.get("effective", counts.get("original", 0))),
            "acc": _metric_entry(res, "acc")[0],
            "acc_norm": _metric_entry(res, "acc_norm")[0],
            "version": versions.get(run_name),
            "source": sources[name],
        }
        result[name] = entry

    def _mean(keys: Iterable[str]) -> float | None:
        vals = [result[k]["value"] for k in keys if k in result and result[k]["value"] is not None]
        return sum(vals) / len(vals) if vals else None

    result["mean"] = _mean(PAPER_TASKS)
    result["mean_all"] = _mean(names)
    result["tasks"] = names
    result["limit"] = limit
    result["lm_eval_version"] = lm_eval_version()
    result["scoring"] = _scoring_record(lm.sharing, lm.share_contexts)  # False after a fallback too
    return result


def _scoring_record(sharing: dict[str, Any], shared: bool) -> dict[str, Any]:
    """How the loglikelihood requests were scored, and the tokens run against lm-eval's own scoring."""
    if not shared:
        out = {"method": "lm-eval"}
        if sharing.get("checked"):
            out["shared_context_check"] = sharing["checked"]
        return out
    ratio = sharing["tokens_run"] / sharing["tokens_lm_eval"] if sharing["tokens_lm_eval"] else None
    return {"method": "shared-context", **sharing, "tokens_ratio": ratio}


def format_zero_shot_table(result: dict[str, Any]) -> str:
    """A text table of ``run_zero_shot``'s result: one row per task, then the mean(s)."""
    from d2prune.io.record import format_table

    names = result.get("tasks") or [t for t in TASKS if t in result]
    rows = [
        {
            "task": n,
            "metric": result[n]["metric"],
            "value": result[n]["value"],
            "stderr": result[n]["stderr"],
            "n": result[n]["n"],
        }
        for n in names
        if n in result
    ]
    paper = [n for n in names if n in PAPER_TASKS]
    rows.append({"task": f"mean ({len(paper)} paper tasks)", "metric": "", "value": result.get("mean")})
    if len(names) != len(paper):
        rows.append({"task": f"mean (all {len(names)})", "metric": "", "value": result.get("mean_all")})
    table = format_table(rows, ["task", "metric", "value", "stderr", "n"])
    scoring = result.get("scoring") or {}
    shared = (
        f", shared-context scoring ({scoring['tokens_ratio']:.2f}x the tokens of lm-eval's)"
        if scoring.get("method") == "shared-context" and scoring.get("tokens_ratio")
        else ""
    )
    return (
        f"{table}\nlm-eval {result.get('lm_eval_version', '?')}, 0-shot"
        + (f", limit {result['limit']}" if result.get("limit") else "")
        + shared
    )
