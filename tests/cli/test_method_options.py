"""The method options generated from the method config dataclasses (d2prune.cli.method_options)."""

import dataclasses
import re
from pathlib import Path

import pytest

from d2prune.cli import build_parser
from d2prune.cli.method_options import method_config_from_args, method_options
from d2prune.errors import UserError
from d2prune.methods import METHODS, MethodConfig

# The command line's defaults before the options were generated (commit 91140e6): a run without a
# flag must still get exactly these values, now from the dataclass defaults (or a "cli_default").
CLI_DEFAULTS = {
    "--s": 1500.0,
    "--auto-s": False,
    "--r1": 1.0,
    "--r2": 0.0,
    "--d2-wanda": True,
    "--d2-sparsegpt": True,
    "--stats-mode": "mean",
    "--wanda-x-exponent": 1.0,
    "--percdamp": 0.01,
    "--blocksize": 128,
    "--alps-rho": 0.1,
    "--alps-iters": 300,
    "--alps-cg-iters": 10,
    "--ria-a": 0.5,
    "--ria-group": "linear",
    "--ria-permute": False,
    "--refit-target-layers": False,
    "--dsnot-base": "wanda",
    "--dsnot-cycles": 50,
    "--dsnot-threshold": 0.1,
    "--dsnot-gamma": 1.0,
    # Passed only when given, then and now: the dataclass default applies.
    "--target-layers": ["self_attn.k_proj"],
    "--dsnot-skip": ["mlp", "fc1", "fc2"],
    "--gradient-cache": None,
    "--gradient-source": None,
}
# Every method flag spelling of 91140e6, aliases and --no- forms included.
FLAGS = {
    "--s",
    "--auto-s",
    "--auto_s",
    "--r1",
    "--r2",
    "--target-layers",
    "--target_layer_names",
    "--d2-wanda",
    "--no-d2-wanda",
    "--d2_wanda",
    "--no-d2_wanda",
    "--d2-sparsegpt",
    "--no-d2-sparsegpt",
    "--d2_sparsegpt",
    "--no-d2_sparsegpt",
    "--stats-mode",
    "--wanda-x-exponent",
    "--percdamp",
    "--blocksize",
    "--alps-rho",
    "--alps-iters",
    "--alps-cg-iters",
    "--ria-a",
    "--ria-group",
    "--ria-permute",
    "--refit-target-layers",
    "--dsnot-base",
    "--dsnot-cycles",
    "--dsnot-threshold",
    "--dsnot-gamma",
    "--dsnot-skip",
    "--gradient-source",
    "--gradient-cache",
    "--method",
    "--prune_method",
}


def _flagged_fields():
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            if f.metadata.get("flags"):
                yield name, f


def _default(f: dataclasses.Field):
    if "cli_default" in f.metadata:
        return f.metadata["cli_default"]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def test_every_field_has_help_and_shared_flags_share_their_metadata():
    for cls in METHODS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    seen = {}
    for name, f in _flagged_fields():
        assert seen.setdefault(f.metadata["flags"][0], dict(f.metadata)) == dict(f.metadata), (name, f.name)


def test_defaults_without_flags_are_the_command_lines_of_before():
    flags = {f.metadata["flags"][0] for _, f in _flagged_fields()}
    assert flags == set(CLI_DEFAULTS)
    for name, f in _flagged_fields():
        assert _default(f) == CLI_DEFAULTS[f.metadata["flags"][0]], (name, f.name)
        assert type(_default(f)) is type(CLI_DEFAULTS[f.metadata["flags"][0]]), (name, f.name)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_run_without_method_flags_gets_the_dataclass_defaults(method):
    config = method_config_from_args(build_parser().parse_args(["prune", "m", "--method", method]))
    assert config.to_dict() == METHODS[method]().to_dict()


def test_every_flag_spelling_of_before_is_accepted_once():
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    strings = [s for action in prune._actions for s in action.option_strings]
    assert FLAGS <= set(strings) and len(strings) == len(set(strings))
    assert len(method_options()) == len(CLI_DEFAULTS)


def test_generated_flags_default_to_none_and_reach_the_method():
    args = build_parser().parse_args(
        [
            "prune",
            "m",
            "--method",
            "dsnot",
            "--dsnot-base",
            "sparsegpt",
            "--percdamp",
            "0.02",
            "--dsnot-skip",
            "none",
            "--no-d2_wanda",
        ]
    )
    assert args.s is None and args.d2_wanda is False
    config = method_config_from_args(args)
    assert config.skip == [] and config.base.percdamp == 0.02 and config.base.blocksize == 128


def test_method_name_fields_build_their_method_from_the_same_options():
    args = build_parser().parse_args(
        ["prune", "m", "--method", "dsnot", "--dsnot-base", " D2Prune ", "--s", "7", "--refit-target-layers"]
    )
    config = method_config_from_args(args)
    assert config.base.name == "d2prune" and config.base.s == 7.0 and config.base.refit_target_layers
    with pytest.raises(UserError, match="unknown --dsnot-base 'obs'"):
        method_config_from_args(build_parser().parse_args(["prune", "m", "--method", "dsnot", "--dsnot-base", "obs"]))


def test_only_for_and_heldout_values_name_the_methods_that_have_them():
    with pytest.raises(
        UserError, match="^--refit-target-layers applies to methods with no-update target layers, not to wanda$"
    ):
        method_config_from_args(build_parser().parse_args(["prune", "m", "--method", "wanda", "--refit-target-layers"]))
    from d2prune.cli.method_options import check_heldout_request, heldout_request

    args = build_parser().parse_args(["prune", "m", "--method", "alps", "--target_layer_names", "auto"])
    assert heldout_request(args) == "--target-layers auto"
    with pytest.raises(
        UserError,
        match=re.escape(
            "--target-layers auto applies to methods with un-updated projections (d2prune, d2alps), not to alps"
        ),
    ):
        check_heldout_request(args, method_config_from_args(args))
    auto = method_config_from_args(build_parser().parse_args(["prune", "m", "--target-layers", "auto"]))
    assert auto.chooses_on_heldout() and auto.heldout_record_key == "target_search"


def test_cli_cli_default_overrides_the_dataclass_default(monkeypatch):
    from d2prune.methods import SparseGPTConfig

    field = next(f for f in dataclasses.fields(SparseGPTConfig) if f.name == "blocksize")
    monkeypatch.setattr(field, "metadata", {**field.metadata, "cli_default": 64})
    assert method_config_from_args(build_parser().parse_args(["prune", "m", "--method", "sparsegpt"])).blocksize == 64


def test_streaming_obstacle_and_heldout_hooks_have_neutral_defaults():
    from d2prune.methods import PrunerZeroConfig, WandaConfig

    assert WandaConfig().streaming_obstacle() is None and not WandaConfig().chooses_on_heldout()
    assert WandaConfig().heldout_candidates(["q_proj"]) == {}
    assert PrunerZeroConfig().streaming_obstacle() == "pruner-zero needs a full-model gradient pass"
    assert MethodConfig.heldout_record_key == "heldout_choice"


def test_cli_modules_name_no_method_and_stay_small():
    for path in (Path(__file__).resolve().parents[2] / "src" / "d2prune" / "cli").glob("*.py"):
        text = path.read_text()
        code = "\n".join(line for line in text.splitlines() if not line.strip().startswith(('"""', "#")))
        # ("d2prune" is also the program's and the package's name, so its method sense is checked via D2PruneConfig.)
        for word in ("dsnot", "target_layers", "needs_gradients", "D2PruneConfig", "alps", "sparsegpt", "pruner-zero"):
            assert word not in code, (path.name, word)
        assert len(text.splitlines()) <= 400, path.name
