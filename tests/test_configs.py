"""Every option of every config group composes, and the data config feeds the model config.

The options are found by listing ``conf/``, so a config file added later is
covered without touching this file. Model and data options are paired only
where the model's ``input`` is the data's ``modality``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR

#: groups whose options are files under conf/<group>/, crossed with the defaults
PLAIN_GROUPS = ("optimizer", "xgrad", "scheduler", "trainer", "logger", "experiment")
#: launchers Hydra's plugins register themselves, plus any conf/hydra/launcher/*.yaml
LAUNCHERS = sorted({"basic", "joblib", *(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))})


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def model_input(model: str) -> str:
    """The modality a model config consumes, following an alias's defaults (model=vit → vit_tiny)."""
    node = OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml")
    return node.input if "input" in node else model_input(node.defaults[0])


def compatible_pairs() -> list[tuple[str, str]]:
    """(model, data) where the model consumes the data's modality."""
    modality = {d: OmegaConf.load(CONF_DIR / "data" / f"{d}.yaml").modality for d in options("data")}
    return [
        (m, d)
        for m in options("model")
        for d in options("data")
        if model_input(m) == modality[d]
    ]


def test_the_groups_of_the_design_are_there():
    assert set(options("optimizer")) >= {"sgdm", "rmsprop", "adam", "adamw", "adabelief", "adam3"}
    assert set(options("xgrad")) == {"off", "on"}
    assert set(options("scheduler")) >= {"none", "multistep", "cosine"}
    assert set(options("logger")) == {"wandb", "tensorboard", "none"}
    assert (CONF_DIR / "experiment").resolve() == (CONF_DIR.parent / "experiments").resolve()


def test_every_model_has_data_to_run_on():
    paired = {m for m, _ in compatible_pairs()}
    assert paired == set(options("model")), f"models without compatible data: {set(options('model')) - paired}"


@pytest.mark.parametrize(("model", "data"), compatible_pairs())
def test_model_and_data_compose_and_resolve(compose_config, model, data):
    cfg = compose_config(f"model={model}", f"data={data}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["name"] == model and resolved["data"]["name"] == data
    assert resolved["model"]["input"] == resolved["data"]["modality"]
    assert "_target_" in resolved["model"]["net"] and "_target_" in resolved["model"]["task"]
    assert "_target_" in resolved["data"]["module"]


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in PLAIN_GROUPS for o in options(g)])
def test_group_option_composes_and_resolves(compose_config, group, option):
    cfg = compose_config(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation has a value
    if group in ("optimizer", "scheduler"):
        assert cfg[group].name == option
    if group == "logger":  # each chosen logger under its own key
        assert list(cfg.logger) == ([] if option == "none" else [option])


def test_several_loggers_at_once_by_one_override(compose_config):
    from xgrad.schema import TensorBoard, Wandb, check

    cfg = compose_config("logger=[wandb,tensorboard]", "logger.wandb.project=elsewhere")
    loggers = check(cfg).logger
    assert isinstance(loggers.wandb, Wandb) and isinstance(loggers.tensorboard, TensorBoard)
    assert loggers.wandb.project == "elsewhere"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_composes_to_an_installed_launcher(compose_config, launcher):
    from hydra.plugins.launcher import Launcher
    from hydra.utils import get_class

    cfg = compose_config(f"hydra/launcher={launcher}", return_hydra_config=True)
    assert issubclass(get_class(cfg.hydra.launcher._target_), Launcher)


def test_image_models_read_their_shape_from_the_data(compose_config):
    cfg = compose_config("model=resnet18", "data.channels=3", "data.image_size=32", "data.num_classes=100")
    net = cfg.model.net
    assert (net.in_channels, net.image_size, net.num_classes) == (3, 32, 100)


def test_optimizer_keys_are_overridable_and_match_the_protocol(compose_config):
    assert compose_config("optimizer=sgdm").optimizer.lr == 0.1
    assert compose_config("optimizer=adamw").optimizer.weight_decay == 0.01
    for name in ("adam", "rmsprop", "adabelief", "adam3"):
        cfg = compose_config(f"optimizer={name}", "optimizer.lr=0.02")
        assert cfg.optimizer.lr == 0.02 and cfg.optimizer.weight_decay == 5e-4


def test_xgrad_on_takes_steps_from_the_command_line(compose_config):
    cfg = compose_config("xgrad=on", "xgrad.steps=3")
    assert cfg.xgrad.enabled and cfg.xgrad.steps == 3
    assert not compose_config("xgrad=off").xgrad.enabled


def test_an_unknown_group_option_is_named(compose_config):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="optimizer/nosuch"):
        compose_config("optimizer=nosuch")


def test_the_entry_point_finds_conf_next_to_the_package():
    import xgrad.train

    assert Path(xgrad.train.CONF_DIR) == CONF_DIR
