"""The one configuration tree: typed, frozen dataclasses, recipes, dotted overrides, JSON round trip,
the stage list.

Every knob of the pipeline lives here, once, with a one-line doc (``setting(default, doc)``).
Components read only their own section (``build_*`` functions take ``cfg.model``, ``cfg.data.shards``,
...); leaves take plain numbers. A *recipe* (``configs/NAME.toml``) overrides defaults only; dotted
command-line overrides (``--train.xe.lr_decoder=4e-4``) are applied on top::

    cfg = load_config("demo", ["--train.xe.epochs=2", "--model.encoder", "resnet18"])
    cfg.to_json()                        # the resolved config, round-trips through Config.from_json
    print(describe_config())             # every key, its type, default and doc

Unknown keys and values of the wrong type raise ``ConfigError`` with the valid keys (or choices)
listed; options that do nothing under the current settings produce warnings (``config_warnings``).

The package: ``schema`` (the tree and its defaults), ``typed`` (type checking, parsing and dotted
keys, independent of the settings), ``loading`` (recipes, overrides, warnings, stages). Import
from ``captioning.config``.
"""

from __future__ import annotations

from captioning.config.loading import (
    CONFIG_DIR_ENV,
    apply_overrides,
    config_dir,
    config_warnings,
    describe_config,
    iter_fields,
    list_recipes,
    load_config,
    load_recipe,
    normalize_overrides,
    parse_overrides,
    recipe_path,
    resolve_stages,
    split_overrides,
    valid_keys,
    without_keys,
)
from captioning.config.schema import (
    STAGES,
    Config,
    DataConfig,
    Dataset,
    DownloadConfig,
    EvalConfig,
    GpuConfig,
    LoaderConfig,
    LocalDataConfig,
    ModelConfig,
    ScstConfig,
    ShardConfig,
    Split,
    Stage,
    StorageConfig,
    SyntheticConfig,
    TrackingConfig,
    TrainConfig,
    XeStageConfig,
)
from captioning.config.typed import (
    ConfigError,
    FieldInfo,
    section,
    setting,
)

__all__ = [
    "CONFIG_DIR_ENV",
    "STAGES",
    "Config",
    "ConfigError",
    "DataConfig",
    "Dataset",
    "DownloadConfig",
    "EvalConfig",
    "FieldInfo",
    "GpuConfig",
    "LoaderConfig",
    "LocalDataConfig",
    "ModelConfig",
    "ScstConfig",
    "ShardConfig",
    "Split",
    "Stage",
    "StorageConfig",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainConfig",
    "XeStageConfig",
    "apply_overrides",
    "config_dir",
    "config_warnings",
    "describe_config",
    "iter_fields",
    "list_recipes",
    "load_config",
    "load_recipe",
    "normalize_overrides",
    "parse_overrides",
    "recipe_path",
    "resolve_stages",
    "section",
    "setting",
    "split_overrides",
    "valid_keys",
    "without_keys",
]
