"""Where a run's training settings come from (issue #24): the task's recipe for the run's
privacy setting, else the stated rule; --run-config and the options still win; the report says
which layer set each value."""

from __future__ import annotations

import json

import pytest

from server.run_config import RunOptions, apply_rule_for_sizes
from shared_models.config import RunConfig
from shared_models.recipes import RECIPE_KEYS, Sources, rule, settings_table, summary_line
from shared_models.tasks import TaskFileError, get_task
from shared_models.tasks.taskfile import parse_task_text
from tests import gbsg2


def _sources(cfg):
    return Sources.from_json(cfg["run.settings-from"]).by_key


def test_chest_xray_gets_its_dp_and_non_dp_recipes_without_run_config():
    dp = RunOptions(task="chest-xray").build()
    assert (dp["model.name"], dp["task.preprocessing"]) == ("scatter-linear", "scatter-28")
    assert (dp["train.batch-size"], dp["train.lr"], dp["train.rounds"]) == (256, 2.0, 10)
    assert _sources(dp)["train.lr"] == "task recipe (chest-xray, DP)"
    plain = RunOptions(task="chest-xray", dp=False).build()
    assert plain["model.name"] == "default" and plain["task.preprocessing"] == "default"  # the CNN
    assert (plain["train.batch-size"], plain["train.lr"], plain["train.momentum"]) == (
        64,
        0.05,
        0.9,
    )
    assert plain["train.rounds"] == 20
    # the presets are the same recipes, still usable as files
    preset = RunOptions(task="chest-xray", run_config="presets/chest-xray.toml").build()
    assert {k: preset[k] for k in RECIPE_KEYS} == {k: dp[k] for k in RECIPE_KEYS}


def test_a_users_model_or_preprocessing_drops_the_recipes_pair_only():
    cfg = RunOptions(task="chest-xray", run_config="task.preprocessing='size-64'").build()
    assert cfg["task.preprocessing"] == "size-64" and cfg["model.name"] == "default"
    assert cfg["train.batch-size"] == 256  # the rest of the DP recipe stays
    assert _sources(cfg)["task.preprocessing"] == "--run-config"
    assert "model.name" not in _sources(cfg)  # the schema's


def test_without_a_recipe_the_rule_picks_by_privacy_and_size():
    dp = RunOptions(task="breast-cancer").build()
    assert (dp["train.batch-size"], dp["train.local-epochs"], dp["train.rounds"]) == (256, 3.0, 10)
    assert dp["train.lr"] == 2.0 and _sources(dp)["train.lr"].startswith("rule for DP-SGD")
    plain = RunOptions(task="breast-cancer", dp=False).build()
    assert (plain["train.batch-size"], plain["train.rounds"], plain["train.lr"]) == (32, 20, 1.0)
    # sizes known (simulation): a large hospital takes one epoch per round under DP
    apply_rule_for_sizes(dp, [300, 5000])
    assert dp["train.local-epochs"] == 1.0 and "largest hospital 5000" in _sources(dp)["train.lr"]
    apply_rule_for_sizes(plain, [300, 5000])
    assert plain["train.rounds"] == 10
    settings, why = rule(dp=True, n_train=None)
    assert "unknown" in why and settings["train.local-epochs"] == 3.0  # server run: small data
    # client-level DP is no DP-SGD at the hospital: the non-DP rule
    cl = RunOptions(task="breast-cancer", run_config="dp.level='client'").build()
    assert cl["train.batch-size"] == 32


def test_run_config_and_options_still_win_and_say_so():
    cfg = RunOptions(task="breast-cancer", rounds=3, run_config="train.lr=0.1").build()
    assert (cfg["train.rounds"], cfg["train.lr"]) == (3, 0.1)
    src = _sources(cfg)
    assert (src["train.rounds"], src["train.lr"]) == ("--rounds", "--run-config")
    apply_rule_for_sizes(cfg, [100])  # the rule never overrides what the user set
    assert (cfg["train.rounds"], cfg["train.lr"]) == (3, 0.1)
    run = RunConfig.from_run_config(cfg)
    table = settings_table(run.recipe_values(), run.settings_from)
    assert table["train.rounds"] == {"value": 3, "source": "--rounds"}
    assert table["model.hidden"]["source"] == "schema default"
    line = summary_line(table)
    assert line.startswith("settings: 3 rounds x 3 local epochs, batch 256, lr 0.1 (")
    assert "--rounds" in line and "rule for DP-SGD" in line


def test_a_task_files_run_tables_are_its_recipe(tmp_path):
    text = gbsg2.TASK + (
        '\n[run]\n"train.rounds" = 12\n\n[run.dp]\n"train.lr" = 1.5\n"train.batch-size" = 128\n'
        '\n[run.no-dp]\n"train.lr" = 0.3\n'
    )
    spec = parse_task_text(text, source="gbsg2.toml")
    assert spec.run == {"train.rounds": 12}
    assert spec.run_dp == {"train.lr": 1.5, "train.batch-size": 128}
    assert spec.run_no_dp == {"train.lr": 0.3}
    from shared_models.tasks import simulation_task

    (path := tmp_path / "gbsg2.toml").write_text(text)
    with simulation_task(path) as (task, _):
        want = {"train.rounds": 12, "train.lr": 1.5, "train.batch-size": 128}
        assert task.recipe(dp=True) == want
        cfg = RunOptions(task=task.name, dp=False).build()
        assert (cfg["train.rounds"], cfg["train.lr"]) == (12, 0.3)
        assert cfg["train.batch-size"] == 32  # the schema's: a recipe is not mixed with the rule
        assert _sources(cfg)["train.lr"] == f"task recipe ({task.name}, no DP)"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('[run]\n"dp.target-epsilon" = 9.0\n', "'dp.target-epsilon' is not a run setting"),
        ('[run.dp]\n"train.rounds" = "ten"\n', "'train.rounds' must be int"),
        ("[run]\ndp = 3\n", "'run.dp' must be a table"),
    ],
)
def test_a_run_table_may_set_training_settings_only(table, problem):
    with pytest.raises(TaskFileError, match=problem):
        parse_task_text(gbsg2.TASK + "\n" + table, source="gbsg2.toml")


def test_the_recipes_and_the_rule_name_schema_keys_only(default_cfg):
    for name in ("chest-xray", "icu-mortality", "breast-cancer", "heart-disease"):
        task = get_task(name)
        for dp in (True, False):
            assert set(task.recipe(dp=dp)) <= set(RECIPE_KEYS) <= set(default_cfg)
    for dp in (True, False):
        assert set(rule(dp=dp, n_train=[10])[0]) <= set(RECIPE_KEYS)
    json.loads(RunOptions().build()["run.settings-from"])


def test_what_to_try_names_the_recipe_only_where_the_user_replaced_it():
    from server.report import quality_warnings

    constant = {"overall": {"sensitivity": 0.0, "specificity": 1.0, "accuracy": 0.7}}
    plain = RunConfig.from_run_config(RunOptions(task="chest-xray").build())
    [line] = quality_warnings(plain, constant)
    assert "predicts negative for every test patient" in line and "presets/" not in line
    mine = RunConfig.from_run_config(
        RunOptions(task="chest-xray", run_config="train.lr=0.01").build()
    )
    [line] = quality_warnings(mine, constant)
    assert (
        "the task's recipe (leave out --run-config, or --run-config presets/chest-xray.toml)"
        in line
    )
