"""One name per knob: every config key is a flag and a TOML key of the same name, configs round-trip,
and bad values fail before anything is built or written, naming the key and flag."""

from __future__ import annotations

import enum
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.commands.run import app
from engine.config import (
    ConfigError,
    Key,
    RunConfig,
    build_config,
    config_keys,
    default_config_path,
    key_by_name,
    load_toml,
    to_toml,
    tomllib,
)

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def other_value(key: Key) -> typing.Any:
    """A valid value of ``key`` that differs from its built-in default and from the demo config's."""
    default = key.field.default
    if isinstance(default, enum.Enum):
        return [m for m in type(default) if m is not default][-1].value
    if key.type is bool:
        return not default
    if key.type is int:
        return default + 3
    if key.type is float:
        return {
            "method.rho": 0.3,
            "optim.momentum": 0.8,
            "data.crop_scale_min": 0.2,
            "data.eval_crop_fraction": 0.9,
            "optim.step_decay_factor": 0.5,
        }.get(key.name, default + 0.125)
    if typing.get_origin(key.type) is tuple:
        item_type = typing.get_args(key.type)[0]
        return {int: [3, 7], str: ["shards/a", "shards/b:tune"]}.get(item_type, [0.3, 0.7])
    return {"device": "cpu", "out_dir": "runs/elsewhere", "arch": "resnet18"}.get(key.name, "some_value")


# Keys whose other value is valid only with another key set too: {key: {other key: value}}.
COMPANIONS = {
    "optim.lr_milestones": {"optim.schedule": "step"},
    "data.unlabelled_root": {"data.unlabelled_split": "some_value"},
}


def with_companions(key: Key, value: typing.Any) -> dict[str, typing.Any]:
    """``{key: value}`` plus the values it needs, as ``{"section.key": value}``."""
    return {key.name: value, **COMPANIONS.get(key.name, {})}


def cli_args(key: Key, value: typing.Any) -> list[str]:
    if key.type is bool:
        return [key.flag if value else f"--no-{key.flag[2:]}"]
    if isinstance(value, list):
        return [arg for item in value for arg in (key.flag, str(item))]
    return [key.flag, str(value)]


def printed_config(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--print-config"])
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout)


def lookup(values: dict, name: str) -> typing.Any:
    section, _, key = name.rpartition(".")
    return (values[section] if section else values)[key]


def test_every_key_is_a_flag_and_a_toml_key_of_the_same_name(tmp_path: Path) -> None:
    keys = config_keys()
    by_name = {key.name: key for key in keys}
    assert len(keys) >= 35
    for key in keys:
        value = other_value(key)
        values = with_companions(key, value)
        from_flag = printed_config(*[arg for name, v in values.items() for arg in cli_args(by_name[name], v)])
        assert lookup(from_flag, key.name) == value, key.name
        nested: dict = {}
        for name, v in values.items():
            section, _, field = name.rpartition(".")
            (nested.setdefault(section, {}) if section else nested)[field] = v
        toml_file = tmp_path / f"{key.name}.toml"
        toml_file.write_text(to_toml(build_config(nested, {})))
        assert lookup(printed_config("--config", str(toml_file)), key.name) == value, key.name


def test_aliases_set_the_same_key() -> None:
    for key in config_keys():
        if key.alias and key.alias != key.flag and key.type is not bool:
            value = other_value(key)
            args = cli_args(key, value)
            aliased = [key.alias if arg == key.flag else arg for arg in args]
            aliased += [
                arg for name, v in COMPANIONS.get(key.name, {}).items() for arg in cli_args(key_by_name()[name], v)
            ]
            assert lookup(printed_config(*aliased), key.name) == value, key.alias


def test_help_lists_every_key_and_the_choices_of_every_enum() -> None:
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for key in config_keys():
        assert key.flag in result.stdout, key.flag
        if isinstance(key.type, type) and issubclass(key.type, enum.Enum):
            assert "|".join(m.value for m in key.type) in result.stdout, key.name
    # arch is a string: any timm model name besides the built-in architectures
    help_text = " ".join(result.stdout.split())
    assert "grid_cnn | resnet18 | resnet50, or any timm model name" in help_text


def test_print_config_round_trips_to_the_default_run(tmp_path: Path) -> None:
    printed = runner.invoke(app, ["--print-config"]).stdout
    (tmp_path / "my.toml").write_text(printed)
    default = build_config(load_toml(default_config_path()), {})
    assert build_config(load_toml(tmp_path / "my.toml"), {}) == default
    assert runner.invoke(app, ["--config", str(tmp_path / "my.toml"), "--print-config"]).stdout == printed


def test_saved_run_config_is_accepted_by_config_and_equal(tmp_path: Path) -> None:
    config = build_config(
        {}, {"method.name": "sigmoid", "optim.lr_per_256": 0.3, "eval_thetas": [0.1], "data.backend": "torch"}
    )
    (tmp_path / "config.toml").write_text(to_toml(config))
    assert build_config(load_toml(tmp_path / "config.toml"), {}) == config


INVALID = [
    (["--steps", "0"], "num_steps (--num_steps / --steps) must be >= 1"),
    (["--steps", "-5"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--k-teacher-steps", "0"], "--k-teacher-steps"),
    (["--k-student-steps", "-1"], "--k-student-steps"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--rho", "0"], "method.rho"),
    (["--rho", "1"], "method.rho"),
    (["--theta", "1.0"], "eval_thetas"),
    (["--theta", "-0.1"], "eval_thetas"),
    (["--lr", "0"], "optim.lr_per_256"),
    (["--momentum", "1.0"], "optim.momentum"),
    (["--image-size", "4"], "data.image_size_px"),
    (["--workers", "-2"], "data.num_workers"),
    (["--arch", "vit_b_16"], "grid_cnn, resnet18, resnet50 nor a timm model name"),
    (["--arch", "resnet5O"], "close matches: resnet50, "),
    (["--arch", "efficientnet_b9x"], "timm.list_models()"),
    (["--schedule", "step", "--step-decay-every", "10", "--lr-milestones", "5"], "not both"),
    (["--lr-milestones", "5"], "optim.lr_milestones (--lr-milestones) [5] is used by optim.schedule = step only"),
    (["--schedule", "step", "--lr-milestones", "9", "--lr-milestones", "5"], "must be strictly increasing"),
    (["--schedule", "step", "--lr-milestones", "0"], "optim.lr_milestones"),
    (["--epochs", "-1"], "num_epochs (--num_epochs / --epochs) must be >= 0"),
    (["--head-lr-scale", "-1"], "optim.head_lr_scale"),
    (["--eval-precision", "fp16"], "bf16"),
    (["--method", "softmaxx"], "softmax"),
    (["--schedule", "linear"], "cosine"),
    (["--loader", "ffcv"], "dali"),
    (["--device", "tpu"], "device (--device) must be auto, cpu, cuda or cuda:N"),
    (["--schedule", "step"], "optim.step_decay_every"),
    (["--nesterov", "--momentum", "0"], "optim.nesterov"),
    (["--eval-crop", "1.5"], "data.eval_crop_fraction"),
    (
        ["--unlabelled-split", "u", "--method", "softmax"],
        "data.unlabelled_split (--unlabelled-split) 'u': method.name (--method) softmax",
    ),
    (["--unlabelled-data", "shards/more"], "data.unlabelled_root (--unlabelled-data) needs data.unlabelled_split"),
]

BAD_TOML = [
    ("num_steps = 30.5\n", "num_steps (--num_steps / --steps): expected a whole number, got 30.5"),
    ('[data]\naugment = "yes"\n', "data.augment (--data.augment / --augment): expected true or false"),
    ('[data]\naugment = "false"\n', "expected true or false"),
    ('[method]\nrho = "0.3"\n', "method.rho (--method.rho / --rho): expected a number"),
    ("[methd]\nrho = 0.3\n", "unknown key 'methd.rho'; did you mean 'method.rho'?"),
    ("[method]\nrh0 = 0.3\n", "unknown key 'method.rh0'"),
    ('method = "mile"\n', "method must be a table"),
    ("eval_thetas = 0.25\n", "eval_thetas (--eval_thetas / --theta): expected a non-empty list"),
    ("eval_thetas = []\n", "eval_thetas (--eval_thetas / --theta): expected a non-empty list"),
    (
        '[data]\nextra_eval = "imagenet"\n',
        "data.extra_eval (--data.extra_eval / --eval-data): expected a list of strings",
    ),
    ("[data]\nextra_eval = [3]\n", "data.extra_eval (--data.extra_eval / --eval-data): expected a string"),
    (
        "[optim]\nlr_milestones = [10.5]\n",
        "optim.lr_milestones (--optim.lr_milestones / --lr-milestones): expected a whole number",
    ),
    ("arch = 3\n", "arch (--arch): expected a string"),
    ("num_steps = true\n", "expected a whole number, got True"),
    ("arch = = 1\n", "not valid TOML"),
]


@pytest.mark.parametrize("args, message", INVALID)
def test_invalid_flag_values_fail_before_any_file_is_written(args: list[str], message: str, tmp_path: Path) -> None:
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    error = result.output + (str(result.exception) if result.exception else "")
    assert message in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", BAD_TOML)
def test_bad_toml_names_the_key(text: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ConfigError) as error:
        build_config(load_toml(tmp_path / "bad.toml"), {}, source=str(tmp_path / "bad.toml"))
    assert message in str(error.value)


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("num_steps = 30.5\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.commands.run",
            "--config",
            str(tmp_path / "bad.toml"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "expected a whole number, got 30.5" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_strings_in_direct_construction_become_enums() -> None:
    from engine.config import Method, MethodConfig

    # strings where the annotations say Method: what this test checks
    assert MethodConfig(name="sigmoid").name is Method.SIGMOID  # type: ignore[arg-type]
    assert f"{Method.MILE}" == "mile" and str(Method.MILE) == "mile"
    with pytest.raises(ConfigError, match="method.name"):
        MethodConfig(name="nope")  # type: ignore[arg-type]


def test_configs_shipped_with_the_package_are_valid() -> None:
    for path in (REPO / "engine" / "configs").glob("*.toml"):
        assert isinstance(build_config(load_toml(path), {}, source=str(path)), RunConfig)
