"""The config's schema: what every key may hold, checked once before anything is built.

Each option of the groups ``trainer``, ``xgrad``, ``scheduler``, ``optimizer``,
``logger``, ``data`` and ``model`` has a dataclass here, stored in Hydra's
ConfigStore as ``schema/<group>/<option>``, and so does the root
(``schema/config``). :func:`check` merges the composed config into them, which
refuses unknown keys (``+trainer.epoch=2`` included: Hydra lets a ``+`` key
through) and values of the wrong type, then applies each field's :class:`Rule`
to the value as given (so ``'5'`` is not an integer and ``nan`` is not a
learning rate). Every refusal is a :class:`ConfigError` of one line: the key,
the value, and what is allowed.

The schemas are not in the groups' defaults lists on purpose: Hydra would then
refuse a bad value while composing, in a multi-line message, before the job
exists, so a sweep job could leave no summary saying why. Checked here, inside
the job, a refusal is one line and a sweep job records it (xgrad/train.py).

An option is matched to its schema by a key every option has: ``optimizer.name``,
``scheduler.name``, ``data.modality``, ``xgrad.enabled``; ``trainer``,
``model`` and ``logger`` have one schema each (``logger`` holds one key per
chosen logger).
A new option (a ``conf/optimizer/<name>.yaml``) needs a dataclass here too;
until it has one it is refused, naming the options that have one.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional, Union

from xgrad.messages import first_line

if TYPE_CHECKING:
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value that cannot run; the message names the key and the value and says what is allowed."""


@dataclass(frozen=True)
class Rule:
    """What a field allows, as a test of the value given and the words a refusal uses."""

    allows: Callable[[Any], bool]
    text: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int) -> Rule:
    return Rule(lambda v: _is_integer(v) and v >= low, f"an integer >= {low}")


def number(low: float = 0.0, *, above: bool = True) -> Rule:
    """A finite number ``> low`` (``above``) or ``>= low``."""
    if above:
        return Rule(lambda v: _is_number(v) and v > low, f"a finite number > {low:g}")
    return Rule(lambda v: _is_number(v) and v >= low, f"a finite number >= {low:g}")


NON_NEGATIVE = number(0, above=False)
#: a learning rate: finite and at most 1000 (SGD on the PTB LSTMs uses 30; 1e308 only overflows the first update)
LEARNING_RATE = Rule(lambda v: _is_number(v) and 0 <= v <= 1e3, "a finite number in [0, 1000]")
#: what every generator a run seeds accepts: NumPy's seeds are 32-bit
SEED = Rule(lambda v: _is_integer(v) and 0 <= v < 2**32, "an integer in [0, 2**32 - 1] (NumPy's seed range)")


def one_of(*values: str) -> Rule:
    return Rule(lambda v: v in values, "one of " + ", ".join(values))


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.allows(v), f"null or {rule.text}")


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
ANYTHING = Rule(lambda v: True, "any value")
BETAS = Rule(
    lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
    "two numbers in [0, 1)",
)
MILESTONES = Rule(
    lambda v: isinstance(v, list) and all(_is_integer(m) and m >= 1 for m in v) and all(a < b for a, b in zip(v, v[1:])),
    "a list of increasing integers >= 1 (epochs after which the rate is multiplied by gamma)",
)
DEVICE = Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
              "auto, cpu, cuda or cuda:N")  # fmt: skip
PRECISION = Rule(lambda v: not isinstance(v, bool) and str(v) in ("32", "bf16", "16"), "one of 32, bf16, 16")
AUTO_OR_BOOLEAN = Rule(lambda v: v == "auto" or isinstance(v, bool), "auto, true or false")


def key(default: Any, rule: Rule, *, trained: bool | tuple[str, ...] = True) -> Any:
    """A schema field: its default (a list or dict default is copied per instance) and its rule.

    ``trained=False`` marks a key that says where or how a run runs, not what it
    trains (a resume may change it; a run directory's name leaves it out); a
    tuple names such keys inside a free node (``data.module``'s ``num_workers``).
    :func:`not_trained` collects the marks.
    """
    metadata = {"rule": rule, "trained": trained}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def constant(value: str) -> Any:
    """A field that must hold exactly ``value`` (an option's ``name`` or ``_target_``)."""
    return key(value, one_of(value))


class Precision(Enum):
    """``trainer.precision``: float32, or autocast to bfloat16 or float16 (with a gradient scaler)."""

    fp32 = 32
    bf16 = "bf16"
    fp16 = 16

    def __str__(self) -> str:
        return str(self.value)  # as the config writes it: 32, bf16, 16


#: ``auto`` or a boolean (OmegaConf types a union of primitives; the rule refuses other strings)
AutoOrBool = Union[bool, str]


# ---------------------------------------------------------------------- groups
# Keys marked ``trained=False`` say where and how a run runs, not what it trains: the hardware and its use
# (xgrad/performance.py: they change the last bits of a GPU's arithmetic or which random numbers a GPU draws,
# never what is trained, and a CPU run not at all), how long it goes on, what it prints and where it logs.


@dataclass
class Trainer:
    epochs: int = key(5, integer(1), trained=False)  # a longer run trains on from the shorter one's checkpoint
    device: str = key("auto", DEVICE, trained=False)
    num_threads: Optional[int] = key(None, optional(integer(1)), trained=False)
    precision: Precision = key(Precision.fp32, PRECISION)
    limit_train_batches: Optional[int] = key(None, optional(integer(1)))
    limit_val_batches: Optional[int] = key(None, optional(integer(1)))
    grad_clip: Optional[float] = key(None, optional(number(0)))
    channels_last: AutoOrBool = key("auto", AUTO_OR_BOOLEAN, trained=False)
    tf32: bool = key(True, BOOLEAN, trained=False)
    compile: bool = key(False, BOOLEAN, trained=False)
    deterministic: bool = key(False, BOOLEAN)
    log_every_n_steps: int = key(10, integer(1), trained=False)
    progress: bool = key(True, BOOLEAN, trained=False)
    checkpoint_every_n_steps: Optional[int] = key(None, optional(integer(1)), trained=False)
    # how the ranks normalise, like how many ranks there are, may change between sessions
    sync_batchnorm: bool = key(False, BOOLEAN, trained=False)


@dataclass
class XGradOff:
    enabled: bool = key(False, BOOLEAN)


@dataclass
class XGradOn:
    enabled: bool = key(True, BOOLEAN)
    steps: int = key(1, integer(0))
    rule: str = key("auto", TEXT)  # the predictor refuses a rule it does not know, at construction
    decoupled_decay: bool = key(False, BOOLEAN)


@dataclass
class SGDM:
    name: str = constant("sgdm")
    _target_: str = constant("torch.optim.SGD")
    _partial_: bool = key(True, BOOLEAN)
    lr: float = key(0.1, LEARNING_RATE)
    momentum: float = key(0.9, NON_NEGATIVE)
    dampening: float = key(0.0, NON_NEGATIVE)
    nesterov: bool = key(False, BOOLEAN)
    weight_decay: float = key(5e-4, NON_NEGATIVE)


@dataclass
class RMSprop:
    name: str = constant("rmsprop")
    _target_: str = constant("torch.optim.RMSprop")
    _partial_: bool = key(True, BOOLEAN)
    lr: float = key(1e-3, LEARNING_RATE)
    alpha: float = key(0.99, Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"))
    eps: float = key(1e-8, NON_NEGATIVE)
    momentum: float = key(0.0, NON_NEGATIVE)
    centered: bool = key(False, BOOLEAN)
    weight_decay: float = key(5e-4, NON_NEGATIVE)


@dataclass
class _Moments:
    """The keys every Adam-style optimizer here shares; each subclass fixes its ``name`` and ``_target_``."""

    name: str = key("", TEXT)
    _target_: str = key("", TEXT)
    _partial_: bool = key(True, BOOLEAN)
    lr: float = key(1e-3, LEARNING_RATE)
    betas: list[float] = key([0.9, 0.999], BETAS)
    eps: float = key(1e-8, NON_NEGATIVE)
    weight_decay: float = key(5e-4, NON_NEGATIVE)


@dataclass
class Adam(_Moments):
    name: str = constant("adam")
    _target_: str = constant("torch.optim.Adam")
    amsgrad: bool = key(False, BOOLEAN)


@dataclass
class AdamW(Adam):
    name: str = constant("adamw")
    _target_: str = constant("torch.optim.AdamW")
    weight_decay: float = key(1e-2, NON_NEGATIVE)


@dataclass
class AdaBelief(_Moments):
    name: str = constant("adabelief")
    _target_: str = constant("xgrad.optim.AdaBelief")


@dataclass
class AdaM3(AdaBelief):
    name: str = constant("adam3")
    _target_: str = constant("xgrad.optim.AdaM3")


@dataclass
class NoScheduler:
    name: str = constant("none")


@dataclass
class MultiStep:
    name: str = constant("multistep")
    _target_: str = constant("torch.optim.lr_scheduler.MultiStepLR")
    _partial_: bool = key(True, BOOLEAN)
    milestones: list[int] = key([150], MILESTONES)
    gamma: float = key(0.1, number(0))


@dataclass
class Cosine:
    name: str = constant("cosine")
    _target_: str = constant("torch.optim.lr_scheduler.CosineAnnealingLR")
    _partial_: bool = key(True, BOOLEAN)
    T_max: int = key(5, integer(1))
    eta_min: float = key(0.0, NON_NEGATIVE)


@dataclass
class Wandb:
    project: str = key("xgrad-repro", TEXT)
    entity: Optional[str] = key(None, optional(TEXT))
    mode: Optional[str] = key(None, optional(one_of("online", "offline", "disabled")))
    init_timeout: float = key(60.0, number(0))


@dataclass
class TensorBoard:
    subdir: str = key("tensorboard", TEXT)


@dataclass
class Loggers:
    """The ``logger`` group: one key per chosen option (``logger=[wandb,tensorboard]`` chooses both; none: empty)."""

    wandb: Optional[Wandb] = None
    tensorboard: Optional[TensorBoard] = None


@dataclass
class Data:
    """What every dataset config has; the module's own arguments are the data module's to check."""

    name: str = key("", TEXT)
    modality: str = key("", TEXT)
    root: Optional[str] = key(None, optional(TEXT), trained=False)
    batch_size: int = key(128, integer(1))
    eval_batch_size: int = key(1000, integer(1))
    module: dict[str, Any] = key({}, ANYTHING, trained=("num_workers",))


@dataclass
class ImageData(Data):
    modality: str = constant("image")
    channels: int = key(1, integer(1))
    image_size: int = key(28, integer(1))
    num_classes: int = key(10, integer(2))
    on_device: AutoOrBool = key("auto", AUTO_OR_BOOLEAN, trained=False)


@dataclass
class TextData(Data):
    modality: str = constant("text")
    vocab_size: int = key(10000, integer(2))
    bptt: int = key(70, integer(1))
    on_device: AutoOrBool = key("auto", AUTO_OR_BOOLEAN, trained=False)


@dataclass
class TranslationData(Data):
    modality: str = constant("translation")
    vocab_size: int = key(32000, integer(8))
    max_len: int = key(50, integer(1))


@dataclass
class Model:
    """A model: the network and the task are built from their own nodes, whose keys are constructor arguments."""

    name: str = key("", TEXT)
    input: str = key("", TEXT)
    channels_last: bool = key(False, BOOLEAN, trained=False)  # a convolutional network: channels-last pays on GPUs
    # torch.compile captures its forward (false: trainer.compile runs it eagerly)
    compiles: bool = key(True, BOOLEAN, trained=False)
    net: dict[str, Any] = key({}, ANYTHING)
    task: dict[str, Any] = key({}, ANYTHING)


@dataclass
class Config:
    """The root: the groups (each checked against its option's schema) and the keys experiments add."""

    data: Any = None
    model: Any = None
    optimizer: Any = None
    xgrad: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = field(default=None, metadata={"trained": False})  # where the run logs
    seed: int = key(0, SEED)
    scale: Optional[str] = key(None, optional(TEXT))  # a protocol's size label (paper, quick, ...)
    paper_epochs: Optional[int] = key(None, optional(integer(1)))  # the paper schedule's length, when shorter
    protocol: Optional[dict[str, Any]] = key(None, ANYTHING)  # a protocol's per-optimizer numbers
    cells: Optional[dict[str, Any]] = key(None, ANYTHING)  # an experiment's cells per scale
    overhead: Optional[dict[str, Any]] = key(None, ANYTHING)  # the overhead benchmark's settings
    tuned: Optional[dict[str, Any]] = key(None, ANYTHING)  # experiments/tuned.yaml: each arm's own lr


#: group → (the key that picks the option's schema, {its value: (option name, schema)})
GROUPS: dict[str, tuple[str | None, dict[Any, tuple[str, type]]]] = {
    "trainer": (None, {None: ("default", Trainer)}),
    "xgrad": ("enabled", {False: ("off", XGradOff), True: ("on", XGradOn)}),
    "optimizer": ("name", {c().name: (c().name, c) for c in (SGDM, RMSprop, Adam, AdamW, AdaBelief, AdaM3)}),
    "scheduler": ("name", {c().name: (c().name, c) for c in (NoScheduler, MultiStep, Cosine)}),
    "logger": (None, {None: ("loggers", Loggers)}),
    "data": ("modality", {c().modality: (c().modality, c) for c in (ImageData, TextData, TranslationData)}),
    "model": (None, {None: ("model", Model)}),
}

@functools.cache
def _store() -> ConfigStore:
    """Hydra's ConfigStore with every schema in it, registered at the first check (the engine and the reports
    read the dataclasses above without loading Hydra)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="config", node=Config)
    for group, (_, options) in GROUPS.items():
        for name, schema in options.values():
            store.store(group=f"schema/{group}", name=name, node=schema)
    return store


def not_trained() -> tuple[str, ...]:
    """Every dotted key marked ``trained=False`` (:func:`key`), over the root and every option of every group."""
    marked = [f.name for f in fields(Config) if f.metadata.get("trained") is False]
    for group, (_, options) in GROUPS.items():
        for _, schema in options.values():
            for f in fields(schema):
                mark = f.metadata.get("trained", True)
                if mark is False:
                    marked.append(f"{group}.{f.name}")
                elif isinstance(mark, tuple):
                    marked.extend(f"{group}.{f.name}.{inner}" for inner in mark)
    return tuple(dict.fromkeys(marked))  # each once, in the order of the schema


def _stored(path: str) -> DictConfig:
    from omegaconf import OmegaConf

    return OmegaConf.create(_store().load(f"schema/{path}.yaml").node)  # a copy: the stored node stays as it is


# ---------------------------------------------------------------------- the check


def check(cfg: DictConfig) -> Config:
    """The config as its typed object (:class:`Config`, each group an instance of its option's dataclass).

    Refuses (:class:`ConfigError`, one line) any key the schema lacks and any value its rule does not allow.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    schema, chosen = _stored("config"), {}
    for group, (selector, options) in GROUPS.items():
        if group not in cfg:
            raise ConfigError(f"{group}: missing; choose one of conf/{group}/")
        pick = None if selector is None else _given(cfg, f"{group}.{selector}")
        if pick not in options:
            names = ", ".join(sorted(str(v) for v in options if v is not None))
            raise ConfigError(f"{group}.{selector}={pick!r}: must be one of {names} (the options with a schema "
                              "in xgrad/schema.py)")  # fmt: skip
        option, _ = chosen[group] = options[pick]
        schema[group] = _stored(f"{group}/{option}")
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(schema, cfg))
    except ConfigKeyError as error:
        raise ConfigError(_unknown_key(cfg, error.full_key, chosen)) from None
    except ValidationError as error:
        raise ConfigError(f"{_shown(cfg, error.full_key)}: must be {_rule_at(chosen, error.full_key).text}") from None
    except OmegaConfBaseException as error:  # an interpolation that does not resolve
        raise ConfigError(f"{_shown(cfg, error.full_key)}: {first_line(getattr(error, 'msg', None) or error)}") from None
    _apply_rules(typed, OmegaConf.to_container(cfg, resolve=True), "")
    return typed


def _apply_rules(obj: Any, given: Any, prefix: str) -> None:
    """Each field's rule on the value as given (resolved), depth first; fields the config lacks keep their default."""
    for f in fields(obj):
        if not isinstance(given, dict) or f.name not in given:
            continue
        value, raw = getattr(obj, f.name), given[f.name]
        path = f"{prefix}{f.name}"
        if is_dataclass(value):
            _apply_rules(value, raw, path + ".")
        elif (rule := f.metadata.get("rule")) is not None and not rule.allows(raw):
            raise ConfigError(f"{path}={raw!r}: must be {rule.text}")


def _given(cfg: DictConfig, path: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.select(cfg, path, default=None)
    except OmegaConfBaseException:
        return None


def _shown(cfg: DictConfig, path: str) -> str:
    """``key=value`` as given: the resolved value, or the interpolation when it does not resolve."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dotted = re.sub(r"\[(\d+)\]", r".\1", path)
    try:
        value = OmegaConf.select(cfg, dotted, throw_on_missing=False)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except OmegaConfBaseException:
        raw = OmegaConf.to_container(cfg, resolve=False)
        for part in dotted.split("."):
            raw = raw[int(part)] if isinstance(raw, list) else raw.get(part) if isinstance(raw, dict) else None
        value = raw
    return f"{path}={value!r}"


def _rule_at(chosen: dict[str, tuple[str, type]], path: str) -> Rule:
    """The rule of the field at ``path`` (a list item's is its list's; a key inside a free node has none)."""
    parent, _, name = re.sub(r"\[\d+\]", "", path).rpartition(".")
    schema = _schema_at(chosen, parent)
    found = {f.name: f for f in fields(schema)}.get(name) if schema is not None else None
    return found.metadata.get("rule", ANYTHING) if found is not None else ANYTHING


def _schema_at(chosen: dict[str, tuple[str, type]], path: str) -> type | None:
    """The dataclass that describes the node at ``path`` ("" for the root; None: a free node, or no such key),
    through the chosen options and the nested dataclasses (``logger.wandb``)."""
    if not path:
        return Config
    group, *rest = path.split(".")
    schema = chosen[group][1] if group in chosen else None
    for name in rest:
        hint = typing.get_type_hints(schema).get(name) if schema is not None else None
        schema = next((t for t in (hint, *typing.get_args(hint)) if is_dataclass(t)), None)
    return schema


def _unknown_key(cfg: DictConfig, path: str, chosen: dict[str, tuple[str, type]]) -> str:
    """``key=value: not a key of <where>``, with the nearest allowed key and the allowed ones."""
    parent, _, name = path.rpartition(".")
    schema = _schema_at(chosen, parent)
    allowed = [f.name for f in fields(schema)] if schema is not None else []
    if parent in chosen and GROUPS[parent][0] in ("name", "enabled"):
        where = f"{parent}={chosen[parent][0]}"
    else:
        where = parent or "the config"
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
    keys = f"; its keys: {', '.join(allowed)}" if allowed else ""
    return f"{_shown(cfg, path)}: not a key of {where}{hint}{keys}"

