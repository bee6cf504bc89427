"""The configs and callback bundles ship inside the package and are found by name from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdelightning.cli import main
from pdelightning.plugin import ENV_VAR, GROUPS, build_callbacks
from pdelightning.resources import (
    UnknownConfigError,
    config_root,
    packaged_configs,
    resolve_config,
    resolve_config_args,
)
from tests.helpers.configs import CONFIGS, ROOT


def test_the_packaged_folder_is_the_one_in_the_source_tree():
    assert config_root().resolve() == CONFIGS.resolve()
    names = packaged_configs()
    assert {"quickstart", "mnist_pde", "newsgroups_transformer", "callbacks:all"} <= set(names)
    # one name per file, nothing left out
    files = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "callbacks").glob("*.yaml"))
    assert sorted(p.resolve() for p in names.values()) == sorted(p.resolve() for p in files)


@pytest.mark.parametrize(
    ("spelling", "file"),
    [
        ("configs/quickstart.yaml", "quickstart.yaml"),
        ("quickstart.yaml", "quickstart.yaml"),
        ("quickstart", "quickstart.yaml"),
        ("./configs/mnist_pde.yaml", "mnist_pde.yaml"),
        ("callbacks/all.yaml", "callbacks/all.yaml"),
        ("callbacks:all", "callbacks/all.yaml"),
        ("callbacks:gradient_flow", "callbacks/gradient_flow.yaml"),
    ],
)
def test_every_spelling_finds_the_packaged_file_from_another_directory(spelling, file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(spelling).resolve() == (CONFIGS / file).resolve()


def test_a_users_own_file_wins_over_the_packaged_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "configs" / "quickstart.yaml"
    mine.parent.mkdir()
    mine.write_text("seed_everything: 7\n")
    assert resolve_config("configs/quickstart.yaml") == Path("configs/quickstart.yaml")
    assert resolve_config_args(["fit", "-c", "configs/quickstart.yaml"]) == ["fit", "-c", "configs/quickstart.yaml"]


def test_config_arguments_are_rewritten_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "-c", "quickstart", "--config=callbacks:all", "--trainer.max_steps=3", "--model.lr", "0.1"]
    out = resolve_config_args(argv)
    assert out[2] == str(CONFIGS / "quickstart.yaml")
    assert out[3] == "--config=" + str(CONFIGS / "callbacks" / "all.yaml")
    assert out[0:2] == argv[0:2] and out[4:] == argv[4:]


def test_an_unknown_name_says_what_it_looked_for_and_the_valid_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownConfigError, match=r"config 'quikstart': no such file.*quickstart.*callbacks:all"):
        resolve_config("quikstart")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "quikstart"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'quikstart'" in err[0] and "quickstart" in err[0]


def test_pdelightning_configs_lists_every_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["configs"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, path in packaged_configs().items():
        assert f"{name} " in out and str(path) in out


def test_the_plugin_takes_a_packaged_bundle_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = build_callbacks("callbacks:all")
    by_path = build_callbacks("callbacks/all.yaml")
    listed = yaml.safe_load((CONFIGS / "callbacks" / "all.yaml").read_text())["trainer"]["callbacks+"]
    assert [type(c) for c in by_name] == [type(c) for c in by_path]
    assert len(by_name) == len(listed) == len(GROUPS["all"])
    with pytest.raises(FileNotFoundError, match=rf"{ENV_VAR}=callbacks:nope: config 'callbacks:nope'"):
        build_callbacks("callbacks:nope")


def test_the_old_reproduce_subcommands_point_to_the_new_command(capsys):
    for argv, expected in (
        (["reproduce", "all", "--quick"], "pdelightning-reproduce all --quick"),
        (["report", "docs/reproduction"], "pdelightning-reproduce report docs/reproduction"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err


def test_a_run_from_another_directory_uses_the_packaged_quickstart(tmp_path):
    """``pdelightning fit -c quickstart`` from a directory with no configs: the packaged YAML, resolved in full."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PDELIGHTNING_CALLBACKS": ""}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdelightning",
            "fit",
            "-c",
            "quickstart",
            "-c",
            "callbacks:gradient_flow",
            "--print_config",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(done.stdout)
    assert (
        config["trainer"]["max_epochs"]
        == yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())["trainer"]["max_epochs"]
    )
    classes = [c["class_path"] for c in config["trainer"]["callbacks"]]
    assert classes.count("pdelightning.callbacks.GradientFlow") == 2  # the quickstart's own and the bundle's
