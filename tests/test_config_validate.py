"""Config.validate(): every named choice, range and type is checked as the config is loaded, the
message names the key, the value and what is allowed, and a bad config touches no existing run."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedtiny import tiny_cli_args

from fedpose.cli import main
from fedpose.config import ConfigError, config_from_dict, load_config
from fedpose.engine.run import check_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("train.optimizer=adamw", "adam, sgd"),
        ("fed.mode=semi", "sync, async"),
        ("fed.gh_variant=mgda", "pcgrad, symmetric"),
        ("fed.gh_order=sorted", "random, index"),
        ("fed.gh_method=svd", "gram, direct"),
        ("data.lsp_labels=xx", "pc, oc"),
        ("model.depth=20", "18, 34, 50, 101, 152"),
        ("train.device=tpu", "auto, cpu, cuda"),
    ],
)
def test_named_choices_name_key_value_and_allowed(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert message.startswith(f"{key}:")
    assert value in message
    assert allowed in message


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("fed.method=fedgh2", "fedavg, fedprox"),
        ("fed.partition=random", "iid, attribute, dirichlet, quantity"),
        ("fed.selection=oort", "random, deadline, utility"),
        ("data.dataset=h36m", "lsp, mpii, coco, synth-arm"),
    ],
)
def test_registered_names_are_checked_by_their_registries(override, allowed):
    # the config knows no registry (it imports nothing of fedpose): it loads the name, and the
    # run's prepare step asks each registry
    cfg = load_config(None, [override])
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    message = str(e.value)
    assert message.startswith(f"{key}:")
    assert value in message
    assert allowed in message


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("train.lr=-1", "> 0"),
        ("train.lr=0", "> 0"),
        ("train.lr=nan", "> 0"),
        ("fed.rounds=0", ">= 1"),
        ("system.dropout=1", "[0, 1)"),
        ("system.dropout=-0.1", "[0, 1)"),
        ("system.availability=0", "(0, 1]"),
        ("fed.server_lr=nan", "> 0"),
        ("fed.server_lr=inf", "> 0"),
        ("fed.clients_per_round=5", "[0, 4]"),
        ("fed.num_clients=0", ">= 1"),
        ("train.batch_size=0", ">= 1"),
        ("train.momentum=1", "[0, 1)"),
        ("data.test_fraction=1", "(0, 1)"),
        ("fed.gh_tau=2", "[-1, 1]"),
        ("fed.buffer_size=0", ">= 1"),
        ("fed.dirichlet_alpha=0", "> 0"),
        ("data.sigma=-2", "> 0"),
        ("seed=-1", ">= 0"),
    ],
)
def test_ranges_name_key_value_and_allowed(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert message.startswith(f"{key}:"), message
    assert str(float(value)) in message or value in message, message
    assert allowed in message, message


@pytest.mark.parametrize(
    "override",
    [
        "model.deconv_layers=2",
        "data.input_size=48",
        "system.speeds=[1, 2, 0, 4]",
        "system.speeds=[1, 'x']",
    ],
)
def test_shapes_the_model_or_federation_cannot_have(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[fed]\nrounds = 1.7\n", "fed.rounds: expected an integer, got 1.7"),
        ("[fed]\nrounds = true\n", "fed.rounds: expected an integer, got True"),
        ("[train]\nlr = true\n", "train.lr: expected a number, got True"),
        ("[data]\naugment = 1\n", "data.augment: expected true or false, got 1"),
        ("[fed]\nmethod = 3\n", "fed.method: expected a string, got 3"),
        ("[system]\nspeeds = 5\n", "system.speeds: expected a list, got 5"),
        ('[fed]\nrounds = "3"\n', None),  # a quoted number is still an integer written as text
    ],
)
def test_toml_types_are_never_converted_silently(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    if message is None:
        assert load_config(path).fed.rounds == 3
        return
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "override", ["fed.rounds=1.7", "fed.rounds=ten", "data.augment=maybe", "train.lr=fast"]
)
def test_override_types(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "name", ["../../x", "/tmp/x", "a/../../b", "", ".hidden", "a//b", "a\\b", "x\ty"]
)
def test_run_names_stay_inside_out_dir(name):
    with pytest.raises(ConfigError, match="name: .* not a plain run name"):
        load_config(None, [f"name={name}"])


def test_plain_and_nested_run_names_are_fine():
    assert load_config(None, ["name=fedgh-s0"]).name == "fedgh-s0"
    assert load_config(None, ["name=demo/fedgh-s0"]).name == "demo/fedgh-s0"


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_config(path)


def test_config_from_dict_validates():
    with pytest.raises(ConfigError, match="fed.rounds"):
        config_from_dict({"fed": {"rounds": 0}})


def test_every_registered_strategy_is_an_allowed_method():
    from fedpose.fl.strategies import STRATEGY_NAMES

    for name in STRATEGY_NAMES:
        sets = [f"fed.method={name}"] + (["fed.server_momentum=0.9"] if name == "fedavgm" else [])
        assert check_config(load_config(None, sets)).fed.method == name
    with pytest.raises(ConfigError, match="fed.method"):
        check_config(load_config(None, ["fed.method=fedgh2"]))


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "bad",
    [
        ["-c", "fed.method=fedgh2"],
        ["-c", "data.dataset=lsp", "-c", "data.root=/no/such/lsp"],
        ["-c", "name=../t"],
    ],
)
def test_a_failed_start_leaves_the_previous_run_as_it_was(tmp_path, synth_dir, capsys, bad):
    args = tiny_cli_args(tmp_path / "runs", synth_dir)
    assert main(["run", "configs/demo.toml", *args]) == 0
    run_dir = tmp_path / "runs" / "t"
    before = _snapshot(run_dir)
    assert {"metrics.jsonl", "model.safetensors", "checkpoints/last.safetensors"} <= set(before)
    capsys.readouterr()
    assert main(["run", "configs/demo.toml", *args, *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert _snapshot(run_dir) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["t"]
