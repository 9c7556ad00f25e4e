"""Read the raw zero-shot task files and convert them to the records of the Hugging Face datasets.

lm-evaluation-harness builds its prompts from the Hugging Face Hub copies of these data sets
(``aps/super_glue``, ``nyu-mll/glue``, ``Rowan/hellaswag``, ...). The files we can read offline are the
original releases (AI2's ARC/OpenBookQA jsonl, SuperGLUE jsonl, WinoGrande/PIQA jsonl plus a labels
list, llama.cpp's HellaSwag text dump). Each ``convert_<task>`` function turns one raw file set into a
list of dicts with exactly the fields, types and label encodings of the Hub split that lm-eval
evaluates, so that lm-eval's own ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` /
``process_docs`` apply unchanged.

Pure Python: no lm-eval, torch or datasets import, so the converters can be checked without a model.
"""

from __future__ import annotations

import bz2
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from d2prune.data import parse_json_lines
from d2prune.errors import UserError


@dataclass(frozen=True)
class LocalTask:
    """How one lm-eval task is run from local files."""

    name: str  # the standard lm-eval task name
    builtin_yaml: str  # lm-eval's own config, relative to the ``lm_eval/tasks`` folder
    split: str  # the split name lm-eval evaluates ("validation" or "test")
    files: tuple[str, ...]  # raw files, relative to ``<data_dir>/<name>/``
    items: int  # item count of the full split (for reference and tests)
    hub: str  # the Hub data set lm-eval downloads otherwise (for messages and records)

    @property
    def local_name(self) -> str:
        """The distinct name our local copy of the task is registered under in lm-eval."""
        return f"d2p_{self.name}"


LOCAL_TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in [
        LocalTask("boolq", "super_glue/boolq/default.yaml", "validation", ("val.jsonl",), 3270, "aps/super_glue:boolq"),
        LocalTask("rte", "glue/rte/default.yaml", "validation", ("val.jsonl",), 277, "nyu-mll/glue:rte"),
        LocalTask(
            "hellaswag",
            "hellaswag/hellaswag.yaml",
            "validation",
            ("hellaswag_val_full.txt.bz2",),
            10042,
            "Rowan/hellaswag",
        ),
        LocalTask(
            "winogrande",
            "winogrande/default.yaml",
            "validation",
            ("dev.jsonl", "dev-labels.lst"),
            1267,
            "allenai/winogrande:winogrande_xl",
        ),
        LocalTask("arc_easy", "arc/arc_easy.yaml", "test", ("ARC-Easy-Test.jsonl",), 2376, "allenai/ai2_arc:ARC-Easy"),
        LocalTask(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            "test",
            ("ARC-Challenge-Test.jsonl",),
            1172,
            "allenai/ai2_arc:ARC-Challenge",
        ),
        LocalTask("openbookqa", "openbookqa/openbookqa.yaml", "test", ("test.jsonl",), 500, "allenai/openbookqa:main"),
        LocalTask("piqa", "piqa/piqa.yaml", "validation", ("valid.jsonl", "valid-labels.lst"), 1838, "baber/piqa"),
    ]
}


def task_folder(data_dir: str | Path, name: str) -> Path:
    return Path(data_dir) / name


def missing_files(data_dir: str | Path, name: str) -> list[str]:
    """The raw files of task ``name`` that are not in ``<data_dir>/<name>/``."""
    folder = task_folder(data_dir, name)
    return [f for f in LOCAL_TASKS[name].files if not (folder / f).is_file()]


def check_files(data_dir: str | Path, name: str) -> Path:
    """The task's folder, or a UserError naming the folder and the files expected there."""
    if name not in LOCAL_TASKS:
        raise UserError(f"unknown zero-shot task {name!r}; known: {', '.join(LOCAL_TASKS)}")
    folder = task_folder(data_dir, name)
    missing = missing_files(data_dir, name)
    if missing:
        expected = ", ".join(LOCAL_TASKS[name].files)
        raise UserError(
            f"zero-shot task {name!r}: no data in {folder} (expected {expected}; missing {', '.join(missing)}). "
            f"Point the data dir at a folder with {name}/{LOCAL_TASKS[name].files[0]}, or allow the Hub "
            f"({LOCAL_TASKS[name].hub})."
        )
    return folder


# ------------------------------------------------------------------------------------------ readers


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return parse_json_lines(fh, path)


def _read_labels(path: Path, n: int) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        labels = [line.strip() for line in fh if line.strip()]
    if len(labels) != n:
        raise UserError(f"{path}: {len(labels)} labels for {n} items")
    return labels


def _field(row: dict, key: str, path: Path, i: int):
    try:
        return row[key]
    except KeyError:
        raise UserError(f"{path}: item {i} has no field {key!r} (fields: {', '.join(row)})") from None


# ------------------------------------------------------------------------------------------ converters


def convert_boolq(folder: Path) -> list[dict]:
    """SuperGLUE BoolQ jsonl (label "true"/"false") → aps/super_glue boolq: question, passage, idx, label (0 False, 1 True)."""
    path = folder / "val.jsonl"
    out = []
    for i, r in enumerate(_read_jsonl(path)):
        label = _field(r, "label", path, i)
        if isinstance(label, str):
            label = {"true": 1, "false": 0}.get(label.strip().lower(), label)
        if label not in (0, 1, True, False):
            raise UserError(f"{path}: item {i} has label {r['label']!r} (expected true/false)")
        out.append(
            {
                "question": _field(r, "question", path, i),
                "passage": _field(r, "passage", path, i),
                "idx": int(r.get("idx", i)),
                "label": int(label),
            }
        )
    return out


def convert_rte(folder: Path) -> list[dict]:
    """SuperGLUE RTE jsonl (premise, hypothesis, label string) → nyu-mll/glue rte: sentence1, sentence2, label, idx.

    GLUE's label encoding: 0 = entailment, 1 = not_entailment (lm-eval's choices are ["True", "False"]).
    """
    path = folder / "val.jsonl"
    codes = {"entailment": 0, "not_entailment": 1}
    out = []
    for i, r in enumerate(_read_jsonl(path)):
        label = _field(r, "label", path, i)
        if isinstance(label, str):
            if label not in codes:
                raise UserError(f"{path}: item {i} has label {label!r} (expected entailment/not_entailment)")
            label = codes[label]
        out.append(
            {
                "sentence1": r["sentence1"] if "sentence1" in r else _field(r, "premise", path, i),
                "sentence2": r["sentence2"] if "sentence2" in r else _field(r, "hypothesis", path, i),
                "label": int(label),
                "idx": int(r.get("idx", i)),
            }
        )
    return out


def _split_hellaswag_context(ctx: str) -> tuple[str, str]:
    """Guess HellaSwag's (ctx_a, ctx_b) from the joined context of the llama.cpp dump.

    lm-eval builds ``ctx_a + " " + ctx_b.capitalize()``; the dump only has ``ctx_a + " " + ctx_b``. In the
    ActivityNet items ctx_b is the lower-case start of the last sentence ("... on a roof. he"); in the
    WikiHow items it is (as far as the dump shows) empty. So: a last sentence (after ". ", "! " or "? ")
    that starts with a lower-case letter is ctx_b; otherwise ctx_b is empty.
    """
    cut = max(ctx.rfind(". "), ctx.rfind("! "), ctx.rfind("? "))
    if cut >= 0:
        tail = ctx[cut + 2 :]
        if tail[:1].islower():
            return ctx[: cut + 1], tail
    return ctx, ""


def convert_hellaswag(folder: Path) -> list[dict]:
    """llama.cpp's HellaSwag dump (6 lines per item) → Rowan/hellaswag validation records.

    Lines: ``<activity_label>: <ctx>``, the gold index, the four endings. The text was already cleaned
    by llama.cpp's extractor (bracket tags removed, " [title]" → ". "), which lm-eval's ``preprocess``
    leaves unchanged; ``ctx_a``/``ctx_b`` are recovered by ``_split_hellaswag_context``. Fields the dump
    lacks (``source_id``, ``split_type``) are empty strings; lm-eval does not read them.
    """
    path = folder / "hellaswag_val_full.txt.bz2"
    try:
        with bz2.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except OSError as e:
        raise UserError(f"{path}: cannot read as bz2 text ({e})") from None
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise UserError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings per item)")
    out = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        if label.strip() not in ("0", "1", "2", "3"):
            raise UserError(f"{path}:{i + 2}: gold label {label!r} is not 0-3")
        activity_label, sep, ctx = head.partition(": ")
        if not sep:
            activity_label, ctx = "", head
        ctx_a, ctx_b = _split_hellaswag_context(ctx)
        out.append(
            {
                "ind": i // 6,
                "activity_label": activity_label,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a,
                "endings": list(endings),
                "source_id": "",
                "split": "val",
                "split_type": "",
                "label": label.strip(),
            }
        )
    return out


def convert_winogrande(folder: Path) -> list[dict]:
    """WinoGrande dev.jsonl + dev-labels.lst → allenai/winogrande winogrande_xl validation: sentence, option1, option2, answer ("1"/"2")."""
    path = folder / "dev.jsonl"
    rows = _read_jsonl(path)
    labels = _read_labels(folder / "dev-labels.lst", len(rows))
    out = []
    for i, (r, lab) in enumerate(zip(rows, labels)):
        if lab not in ("1", "2"):
            raise UserError(f"{folder / 'dev-labels.lst'}: line {i + 1} is {lab!r} (expected 1 or 2)")
        if "answer" in r and str(r["answer"]) != lab:
            raise UserError(f"{path}: item {i} answer {r['answer']!r} disagrees with dev-labels.lst ({lab})")
        sentence = _field(r, "sentence", path, i)
        if "_" not in sentence:
            raise UserError(f"{path}: item {i} sentence has no '_' blank")
        out.append(
            {
                "sentence": sentence,
                "option1": _field(r, "option1", path, i),
                "option2": _field(r, "option2", path, i),
                "answer": lab,
            }
        )
    return out


def _convert_ai2(folder: Path, filename: str, question_key: str) -> list[dict]:
    path = folder / filename
    out = []
    for i, r in enumerate(_read_jsonl(path)):
        q = _field(r, "question", path, i)
        if not isinstance(q, dict) or "stem" not in q or "choices" not in q:
            raise UserError(f"{path}: item {i} has no question.stem / question.choices (AI2 jsonl layout)")
        texts = [c["text"] for c in q["choices"]]
        labels = [c["label"] for c in q["choices"]]
        key = _field(r, "answerKey", path, i)
        if key.strip() not in labels:
            raise UserError(f"{path}: item {i} answerKey {key!r} is not one of its choice labels {labels}")
        out.append(
            {
                "id": r.get("id", str(i)),
                question_key: q["stem"],
                "choices": {"text": texts, "label": labels},
                "answerKey": key,
            }
        )
    return out


def convert_arc_easy(folder: Path) -> list[dict]:
    """AI2 ARC jsonl → allenai/ai2_arc: id, question (the stem), choices {text, label}, answerKey."""
    return _convert_ai2(folder, "ARC-Easy-Test.jsonl", "question")


def convert_arc_challenge(folder: Path) -> list[dict]:
    """AI2 ARC jsonl → allenai/ai2_arc: id, question (the stem), choices {text, label}, answerKey."""
    return _convert_ai2(folder, "ARC-Challenge-Test.jsonl", "question")


def convert_openbookqa(folder: Path) -> list[dict]:
    """OpenBookQA main jsonl → allenai/openbookqa main: id, question_stem, choices {text, label}, answerKey."""
    return _convert_ai2(folder, "test.jsonl", "question_stem")


def convert_piqa(folder: Path) -> list[dict]:
    """PIQA valid.jsonl + valid-labels.lst → baber/piqa validation: goal, sol1, sol2, label (0/1)."""
    path = folder / "valid.jsonl"
    rows = _read_jsonl(path)
    labels = _read_labels(folder / "valid-labels.lst", len(rows))
    out = []
    for i, (r, lab) in enumerate(zip(rows, labels)):
        if lab not in ("0", "1"):
            raise UserError(f"{folder / 'valid-labels.lst'}: line {i + 1} is {lab!r} (expected 0 or 1)")
        out.append(
            {
                "goal": _field(r, "goal", path, i),
                "sol1": _field(r, "sol1", path, i),
                "sol2": _field(r, "sol2", path, i),
                "label": int(lab),
            }
        )
    return out


CONVERTERS: dict[str, Callable[[Path], list[dict]]] = {
    "boolq": convert_boolq,
    "rte": convert_rte,
    "hellaswag": convert_hellaswag,
    "winogrande": convert_winogrande,
    "arc_easy": convert_arc_easy,
    "arc_challenge": convert_arc_challenge,
    "openbookqa": convert_openbookqa,
    "piqa": convert_piqa,
}


def load_task_docs(data_dir: str | Path, name: str) -> list[dict]:
    """Check the files of task ``name`` under ``data_dir`` and return its records in the Hub layout."""
    folder = check_files(data_dir, name)
    docs = CONVERTERS[name](folder)
    if not docs:
        raise UserError(f"zero-shot task {name!r}: {folder} holds no items")
    return docs
