"""Zero-shot evaluation through lm-evaluation-harness on local task files (fully offline)."""

from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from conftest import SHARED, build_tiny_model  # noqa: E402
from d2prune.errors import UserError  # noqa: E402
from d2prune.evaluation.tasks.convert import CONVERTERS, LOCAL_TASKS, load_task_docs  # noqa: E402
from d2prune.evaluation.zeroshot import (  # noqa: E402
    METRICS,
    PAPER_TASKS,
    TASKS,
    format_zero_shot_table,
    local_lm_eval_tasks,
    run_zero_shot,
)

TOKENIZER_DIR = SHARED / "models" / "aidreams260K"

# ---------------------------------------------------------------- fixture files in the raw formats

BOOLQ = [
    {"question": "is the sky blue", "passage": "Sky -- The sky is blue on a clear day.", "idx": 0, "label": "true"},
    {"question": "is fire cold", "passage": "Fire -- Fire is hot.", "idx": 1, "label": "false"},
    {"question": "do cats bark", "passage": "Cat -- Cats meow and purr.", "idx": 2, "label": "false"},
]
RTE = [
    {"premise": "A dog ran across the park.", "hypothesis": "An animal ran.", "label": "entailment", "idx": 0},
    {
        "premise": "The shop is closed on Sunday.",
        "hypothesis": "The shop opens on Sunday.",
        "label": "not_entailment",
        "idx": 1,
    },
    {"premise": "Tom bought a red car.", "hypothesis": "Tom owns a car.", "label": "entailment", "idx": 2},
]
HELLASWAG = [  # llama.cpp layout: "<activity>: <ctx>", gold, four endings
    (
        "Roof shingle removal: A man is sitting on a roof. he",
        3,
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
    ),
    (
        "Home and Garden: How to clean a sink. Rinse the sink with warm water.",
        0,
        ["Scrub it with soap.", "Paint the sink red.", "Eat the sponge.", "Throw the sink away."],
    ),
    (
        "High jump: A boy is running down a track. the boy",
        1,
        ["eats a sandwich.", "jumps over the bar.", "sits down.", "sings a song."],
    ),
]
WINOGRANDE = [
    {
        "qID": "a-1",
        "sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "1",
    },
    {
        "qID": "a-2",
        "sentence": "The cup did not fit in the box because _ was too big.",
        "option1": "the cup",
        "option2": "the box",
        "answer": "1",
    },
    {
        "qID": "a-3",
        "sentence": "Ann gave Beth a gift because _ had a birthday.",
        "option1": "Ann",
        "option2": "Beth",
        "answer": "2",
    },
]


def _ai2(qid, stem, texts, key, labels=None):
    labels = labels or list("ABCDE")[: len(texts)]
    return {
        "id": qid,
        "question": {"stem": stem, "choices": [{"text": t, "label": lab} for t, lab in zip(texts, labels)]},
        "answerKey": key,
    }


ARC_EASY = [
    _ai2("e1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], "B"),
    _ai2("e2", "What melts ice?", ["heat", "cold", "dark"], "A"),
    _ai2("e3", "All matter is made of", ["air", "elements", "water", "soil"], "2", labels=["1", "2", "3", "4"]),
    _ai2("e4", "Which is a planet?", ["Sun", "Moon", "Mars", "Comet", "Star"], "C"),
]
ARC_CHALLENGE = [
    _ai2("c1", "Which force pulls objects to Earth?", ["friction", "gravity", "magnetism", "tension"], "B"),
    _ai2(
        "c2",
        "What is the boiling point of water at sea level?",
        ["50 C", "75 C", "100 C", "150 C"],
        "3",
        labels=["1", "2", "3", "4"],
    ),
    _ai2("c3", "Which is a mammal?", ["shark", "whale", "trout", "eel"], "B"),
]
OPENBOOKQA = [
    _ai2("8-1", "There is most likely going to be fog around:", ["a marsh", "a tundra", "the plains", "a desert"], "A"),
    _ai2("8-2", "The sun is responsible for", ["puppies learning", "plants sprouting", "rocks", "cold"], "B"),
    _ai2("8-3", "A magnet will stick to", ["wood", "glass", "an iron nail", "paper"], "C"),
]
PIQA = [
    {
        "id": "p1",
        "goal": "How do I dry wet shoes?",
        "sol1": "Stuff them with newspaper.",
        "sol2": "Put them in the freezer.",
    },
    {"id": "p2", "goal": "To cut bread,", "sol1": "use a spoon.", "sol2": "use a bread knife."},
    {"id": "p3", "goal": "Keep soup warm", "sol1": "on a low flame.", "sol2": "in the fridge."},
]
PIQA_LABELS = [0, 1, 0]

N_ITEMS = {
    "boolq": 3,
    "rte": 3,
    "hellaswag": 3,
    "winogrande": 3,
    "arc_easy": 4,
    "arc_challenge": 3,
    "openbookqa": 3,
    "piqa": 3,
}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_fixture_data(root: Path) -> Path:
    _jsonl(root / "boolq" / "val.jsonl", BOOLQ)
    _jsonl(root / "rte" / "val.jsonl", RTE)
    (root / "hellaswag").mkdir(parents=True)
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as fh:
        for head, gold, endings in HELLASWAG:
            fh.write("\n".join([head, str(gold), *endings]) + "\n")
    _jsonl(root / "winogrande" / "dev.jsonl", WINOGRANDE)
    (root / "winogrande" / "dev-labels.lst").write_text("".join(r["answer"] + "\n" for r in WINOGRANDE))
    _jsonl(root / "arc_easy" / "ARC-Easy-Test.jsonl", ARC_EASY)
    _jsonl(root / "arc_challenge" / "ARC-Challenge-Test.jsonl", ARC_CHALLENGE)
    _jsonl(root / "openbookqa" / "test.jsonl", OPENBOOKQA)
    _jsonl(root / "piqa" / "valid.jsonl", PIQA)
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{x}\n" for x in PIQA_LABELS))
    return root


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory) -> Path:
    return write_fixture_data(tmp_path_factory.mktemp("zs_data"))


@pytest.fixture(scope="module")
def local_tasks(fixture_data, tmp_path_factory):
    return local_lm_eval_tasks(TASKS, fixture_data, tmp_path_factory.mktemp("zs_tasks"))


# ---------------------------------------------------------------- the prompts lm-eval builds

# (text, choices, target) lm-eval gives for the first fixture item of each task, written out from
# lm-eval's task definitions (prompt templates of the 0.4.x YAMLs).
EXPECTED_FIRST = {
    "boolq": ("Sky -- The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", ["no", "yes"], 1),
    "rte": ("A dog ran across the park.\nQuestion: An animal ran. True or False?\nAnswer:", ["True", "False"], 0),
    "hellaswag": ("Roof shingle removal: A man is sitting on a roof. He", HELLASWAG[0][2], 3),
    # partial evaluation: the text is the index of the right context, the choices the two contexts
    "winogrande": (
        0,
        ["Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"],
        "got the harder cases.",
    ),
    "arc_easy": ("Question: Which gas do plants take in?\nAnswer:", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    "arc_challenge": (
        "Question: Which force pulls objects to Earth?\nAnswer:",
        ["friction", "gravity", "magnetism", "tension"],
        1,
    ),
    "openbookqa": (
        "There is most likely going to be fog around:",
        ["a marsh", "a tundra", "the plains", "a desert"],
        0,
    ),
    "piqa": (
        "Question: How do I dry wet shoes?\nAnswer:",
        ["Stuff them with newspaper.", "Put them in the freezer."],
        0,
    ),
}


def _docs(task) -> list[dict]:
    return list(task.eval_docs)


@pytest.mark.parametrize("name", TASKS)
def test_local_task_prompts(local_tasks, name):
    task = local_tasks[name]
    docs = _docs(task)
    assert len(docs) == N_ITEMS[name]
    text, choices, target = EXPECTED_FIRST[name]
    assert task.doc_to_text(docs[0]) == text
    assert task.doc_to_choice(docs[0]) == choices
    assert task.doc_to_target(docs[0]) == target
    for doc in docs:  # every gold answer is a valid choice index / continuation
        tgt = task.doc_to_target(doc)
        assert isinstance(tgt, str) or 0 <= tgt < len(task.doc_to_choice(doc))


def test_arc_digit_labels_and_odd_choice_counts(local_tasks):
    docs = _docs(local_tasks["arc_easy"])
    task = local_tasks["arc_easy"]
    assert [task.doc_to_target(d) for d in docs] == [1, 0, 1, 2]
    assert [len(task.doc_to_choice(d)) for d in docs] == [4, 3, 4, 5]
    assert [task.doc_to_target(d) for d in _docs(local_tasks["arc_challenge"])] == [1, 2, 1]


def test_hellaswag_context_split():
    from d2prune.evaluation.tasks.convert import _split_hellaswag_context

    assert _split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert _split_hellaswag_context("How to x. Rinse it.") == ("How to x. Rinse it.", "")
    assert _split_hellaswag_context("no sentence end here") == ("no sentence end here", "")


def _builtin_task(name: str, docs: list[dict], monkeypatch):
    """lm-eval's own task ``name`` (its installed YAML and utils), fed ``docs`` instead of the Hub data set."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    from d2prune.evaluation.tasks.configs import builtin_yaml

    try:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(builtin_yaml(name), resolve_func=True)
    except ImportError:  # older 0.4.x
        from lm_eval.utils import load_yaml_config

        cfg = load_yaml_config(yaml_path=str(builtin_yaml(name)), mode="full")
    for key in ("tag", "group"):
        cfg.pop(key, None)
    split = LOCAL_TASKS[name].split
    assert cfg[f"{split}_split"] == split  # lm-eval evaluates the split our file holds

    splits = {cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)}

    def fake_download(self, *args, **kwargs):  # the same documents in every split the config names
        self.dataset = datasets.DatasetDict({s: datasets.Dataset.from_list(docs) for s in splits})

    monkeypatch.setattr(ConfigurableTask, "download", fake_download)
    return ConfigurableTask(config=cfg)


def _requests(task) -> list[tuple]:
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [(inst.doc_id, inst.idx, tuple(inst.arguments)) for inst in task.instances]


@pytest.mark.parametrize("name", TASKS)
def test_same_prompts_as_builtin_task(local_tasks, fixture_data, name, monkeypatch):
    ours = local_tasks[name]
    builtin = _builtin_task(name, load_task_docs(fixture_data, name), monkeypatch)
    assert ours.OUTPUT_TYPE == builtin.OUTPUT_TYPE == "multiple_choice"
    assert ours.config.metric_list == builtin.config.metric_list
    assert ours.config.target_delimiter == builtin.config.target_delimiter
    assert ours.config.metadata.get("version") == builtin.config.metadata.get("version")
    for a, b in zip(_docs(ours), _docs(builtin), strict=True):
        assert ours.doc_to_text(a) == builtin.doc_to_text(b)
        assert ours.doc_to_choice(a) == builtin.doc_to_choice(b)
        assert ours.doc_to_target(a) == builtin.doc_to_target(b)
    # the loglikelihood requests themselves: (context, continuation) pairs
    assert _requests(ours) == _requests(builtin)


# ---------------------------------------------------------------- a run on a tiny model


@pytest.fixture(scope="module")
def tiny_lm():
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer at {TOKENIZER_DIR}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = build_tiny_model("llama-gqa", vocab_size=512, max_position_embeddings=1024)
    return model, tok


def test_run_zero_shot_all_tasks(tiny_lm, fixture_data):
    import torch

    model, tok = tiny_lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pad_before = tok.pad_token
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    result = run_zero_shot(model, tok, tasks=TASKS, data_dir=fixture_data, limit=None)
    assert torch.equal(torch.rand(3), expected_draw)  # lm-eval's seeding does not leak out
    assert tok.pad_token == pad_before  # the caller's tokenizer is not modified
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"

    for name in TASKS:
        r = result[name]
        assert r["n"] == N_ITEMS[name], name
        assert r["metric"] == METRICS[name], name
        assert 0.0 <= r["value"] <= 1.0
        assert r["stderr"] is None or r["stderr"] >= 0
        assert r["source"] == str((fixture_data / name).resolve())
    assert math.isclose(result["mean"], sum(result[t]["value"] for t in PAPER_TASKS) / 7)
    assert math.isclose(result["mean_all"], sum(result[t]["value"] for t in TASKS) / 8)
    assert result["lm_eval_version"].startswith("0.4")

    table = format_zero_shot_table(result)
    assert "hellaswag" in table and "acc_norm" in table and "mean (7 paper tasks)" in table

    # Shared-context scoring (the default) gives lm-eval's own accuracies with fewer tokens run.
    assert result["scoring"]["method"] == "shared-context" and result["scoring"]["tokens_ratio"] < 1
    assert "shared-context scoring" in table
    stock = run_zero_shot(model, tok, tasks=TASKS, data_dir=fixture_data, share_contexts=False)
    assert stock["scoring"] == {"method": "lm-eval"}
    assert {t: stock[t]["value"] for t in TASKS} == {t: result[t]["value"] for t in TASKS}

    # limit cuts each task to its first items
    small = run_zero_shot(model, tok, tasks="arc_easy,winogrande", data_dir=fixture_data, limit=2, batch_size=4)
    assert small["arc_easy"]["n"] == small["winogrande"]["n"] == 2
    assert small["tasks"] == ["arc_easy", "winogrande"]


def test_missing_data_names_folder_and_files(tmp_path, tiny_lm):
    model, tok = tiny_lm
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text(json.dumps(PIQA[0]) + "\n")
    with pytest.raises(UserError) as e:
        run_zero_shot(model, tok, tasks=["piqa"], data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "piqa") in msg and "valid.jsonl" in msg and "valid-labels.lst" in msg
    with pytest.raises(UserError) as e:
        run_zero_shot(model, tok, tasks=["winogrande"], data_dir=tmp_path)
    assert str(tmp_path / "winogrande") in str(e.value) and "dev.jsonl" in str(e.value)
    with pytest.raises(UserError, match="unknown zero-shot task"):
        run_zero_shot(model, tok, tasks=["mmlu"], data_dir=tmp_path)


def test_offline_false_falls_back_to_hub_tasks(tmp_path, fixture_data):
    from d2prune.evaluation.zeroshot import _split_local_hub

    assert _split_local_hub(["piqa", "boolq"], fixture_data, offline=True) == (["piqa", "boolq"], [])
    assert _split_local_hub(["piqa", "boolq"], tmp_path, offline=False) == ([], ["piqa", "boolq"])
    with pytest.raises(UserError, match="boolq"):
        _split_local_hub(["boolq"], tmp_path, offline=True)


def test_converter_errors(tmp_path):
    _jsonl(tmp_path / "winogrande" / "dev.jsonl", WINOGRANDE)
    (tmp_path / "winogrande" / "dev-labels.lst").write_text("1\n2\n")
    with pytest.raises(UserError, match="2 labels for 3 items"):
        load_task_docs(tmp_path, "winogrande")
    _jsonl(tmp_path / "rte" / "val.jsonl", [{"premise": "a", "hypothesis": "b", "label": "maybe"}])
    with pytest.raises(UserError, match="maybe"):
        load_task_docs(tmp_path, "rte")


# ---------------------------------------------------------------- the real shared data (no model)

REAL_COUNTS = {
    "boolq": 3270,
    "rte": 277,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
    "piqa": 1838,
}
HUB_FIELDS = {
    "boolq": {"question", "passage", "idx", "label"},
    "rte": {"sentence1", "sentence2", "label", "idx"},
    "hellaswag": {
        "ind",
        "activity_label",
        "ctx_a",
        "ctx_b",
        "ctx",
        "endings",
        "source_id",
        "split",
        "split_type",
        "label",
    },
    "winogrande": {"sentence", "option1", "option2", "answer"},
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "openbookqa": {"id", "question_stem", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
}


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="no shared data folder")
@pytest.mark.parametrize("name", TASKS)
def test_real_data_converts(name):
    folder = SHARED / "data" / name
    if not folder.is_dir():
        pytest.skip(f"no {folder}")
    docs = CONVERTERS[name](folder)
    assert len(docs) == REAL_COUNTS[name] == LOCAL_TASKS[name].items
    assert all(set(d) == HUB_FIELDS[name] for d in docs)
    if name == "hellaswag":
        # the ActivityNet items (about a third) keep a lower-case ctx_b that lm-eval capitalizes
        assert 3000 < sum(1 for d in docs if d["ctx_b"]) < 3500
        assert all(len(d["endings"]) == 4 for d in docs)
