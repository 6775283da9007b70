"""Resolving a run's config: recipes (``configs/NAME.toml``), dotted command-line overrides, warnings for
options that do nothing, the stage list, and a description of every key.

    cfg = load_config("demo", ["--train.xe.epochs=2", "--model.encoder", "resnet18"])
    own, overrides = split_overrides(sys.argv[1:])     # a command's own arguments vs dotted overrides
    resolve_stages(None, cfg)                          # ["xe", "finetune", "scst"]
    print(describe_config())                           # every key, its type, default and doc
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from captioning.config import typed
from captioning.config.schema import STAGES, Config, XeStageConfig
from captioning.config.typed import ConfigError, FieldInfo, check_key, get_dotted, parse_text

# The repository's recipe folder; CAPTIONING_CONFIG_DIR points elsewhere (e.g. an installed wheel).
CONFIG_DIR_ENV = "CAPTIONING_CONFIG_DIR"
_REPO_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def iter_fields() -> Iterator[FieldInfo]:
    """Every leaf of the config tree, depth first, with its dotted key, type, default and doc."""
    return typed.iter_fields(Config)


def valid_keys() -> list[str]:
    """Every dotted leaf key."""
    return list(typed.valid_keys(Config))


def describe_config(cfg: Config | None = None) -> str:
    """A table of every key: type, value (the resolved one when ``cfg`` is given) and doc."""
    plain = (cfg or Config()).to_dict()
    lines = []
    for info in iter_fields():
        value = get_dotted(plain, info.key)
        lines.append(f"{info.key} : {info.type_name} = {json.dumps(value)}\n    {info.doc}")
    return "\n".join(lines)


def config_dir() -> Path:
    """The recipe folder: $CAPTIONING_CONFIG_DIR or the repository's configs/."""
    return Path(os.environ.get(CONFIG_DIR_ENV) or _REPO_CONFIG_DIR)


def list_recipes() -> list[str]:
    """Names of the recipes in the recipe folder."""
    return sorted(p.stem for p in config_dir().glob("*.toml"))


def recipe_path(recipe: str | os.PathLike[str]) -> Path:
    """Resolve a recipe name (``demo``) or a path to a .toml file."""
    path = Path(recipe)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    candidate = config_dir() / f"{recipe}.toml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown recipe {str(recipe)!r}; available: {', '.join(list_recipes()) or '(none)'}"
        )
    return candidate


def load_recipe(recipe: str | os.PathLike[str]) -> Config:
    """Defaults overridden by one recipe file (TOML tables mirror the config tree)."""
    path = recipe_path(recipe)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    data.setdefault("recipe", path.stem)
    try:
        return Config.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def parse_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``["--a.b=1", "--c.d", "2"]`` -> ``{"a.b": "1", "c.d": "2"}`` (values still text)."""
    out: dict[str, str] = {}
    i = 0
    args = list(argv)
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --train.xe.lr_decoder=4e-4, got {arg!r}")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{body} has no value (use --{body}=VALUE)")
            key, value = body, args[i + 1]
            i += 1
        check_key(Config, key)
        if key in out:
            raise ConfigError(f"override --{key} given twice")
        out[key] = value
        i += 1
    return out


def apply_overrides(cfg: Config, overrides: Mapping[str, str]) -> Config:
    """Set dotted keys from their text form, parsed by the field's type."""
    fields = {f.key: f for f in iter_fields()}
    values: dict[str, object] = {}
    for key, text in overrides.items():
        check_key(Config, key)
        values[key] = parse_text(text, fields[key].type, key)
    return cfg.replace(values)


def load_config(recipe: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the recipe (when given), then the dotted command-line overrides."""
    cfg = load_recipe(recipe) if recipe is not None else Config()
    return apply_overrides(cfg, parse_overrides(overrides))


def config_warnings(cfg: Config) -> list[str]:
    """Options that do nothing under the current settings (habit 3: they warn, they do not fail)."""
    warnings = []
    defaults = Config()
    for name in ("xe", "finetune"):
        stage: XeStageConfig = getattr(cfg.train, name)
        default_stage: XeStageConfig = getattr(defaults.train, name)
        if not stage.fine_tune_encoder:
            if stage.lr_encoder != default_stage.lr_encoder:
                warnings.append(f"train.{name}.lr_encoder is set but train.{name}.fine_tune_encoder is false")
            if stage.fine_tune_from_block != default_stage.fine_tune_from_block:
                warnings.append(
                    f"train.{name}.fine_tune_from_block is set but train.{name}.fine_tune_encoder is false"
                )
        if stage.lr_schedule != "plateau" and (
            stage.decay_factor != default_stage.decay_factor
            or stage.decay_patience != default_stage.decay_patience
        ):
            warnings.append(f"train.{name}.decay_factor/decay_patience only apply to lr_schedule='plateau'")
    if cfg.data.dataset != "synthetic" and cfg.data.synthetic != defaults.data.synthetic:
        warnings.append("data.synthetic.* is set but data.dataset is not 'synthetic'")
    if cfg.data.dataset != "local" and cfg.data.local != defaults.data.local:
        warnings.append("data.local.* is set but data.dataset is not 'local'")
    if cfg.data.dataset != "flickr30k" and cfg.data.download.flickr30k_archive is not None:
        warnings.append("data.download.flickr30k_archive is set but data.dataset is not 'flickr30k'")
    download = cfg.data.download
    if not download.verify_checksums and (download.checksums or download.checksums_file is not None):
        warnings.append(
            "data.download.checksums/checksums_file are ignored when data.download.verify_checksums is false"
        )
    if (
        cfg.model.embeddings_path is None
        and cfg.model.fine_tune_embeddings != defaults.model.fine_tune_embeddings
    ):
        warnings.append("model.fine_tune_embeddings is set but model.embeddings_path is none")
    if (
        cfg.data.loader.caption_mode == "all"
        and cfg.data.loader.seq_per_img != defaults.data.loader.seq_per_img
    ):
        warnings.append("data.loader.seq_per_img is ignored when data.loader.caption_mode='all'")
    if "scst" not in cfg.train.stages and cfg.train.scst != defaults.train.scst:
        warnings.append("train.scst.* is set but 'scst' is not in train.stages")
    if cfg.model.arch != "show_attend_tell":
        for name in ("xe", "finetune"):
            if getattr(cfg.train, name).alpha_c != getattr(defaults.train, name).alpha_c:
                warnings.append(f"train.{name}.alpha_c only applies to model.arch='show_attend_tell'")
    return warnings


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate dotted overrides (``--a.b=1`` or ``--a.b 1``) from a command's own arguments.

    Done before argparse so that an override's value is never taken for a positional argument.
    Unknown dotted keys are kept as overrides, to fail later with the list of valid keys.
    """
    # Top-level config keys (``--seed``) are overrides too; ``--recipe`` is the subcommands' option.
    top_level = {k for k in typed.valid_keys(Config) if "." not in k} - {"recipe"}
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].split("=", 1)[0]
        if arg.startswith("--") and ("." in key or key in top_level):
            overrides.append(arg)
            if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            own.append(arg)
        i += 1
    return own, overrides


def normalize_overrides(overrides: Sequence[str] | None) -> list[str]:
    """Flow parameters take ``a.b=1`` or ``--a.b=1``; the command-line form (``--a.b=1``) comes out."""
    return [o if o.startswith("--") else f"--{o}" for o in (overrides or [])]


def without_keys(overrides: Sequence[str] | None, *keys: str) -> list[str]:
    """The overrides (command-line form) minus those that set one of ``keys``, or a key under a
    section among them (``"train.stages"``: a stage launch trains its own stage)."""

    def dropped(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in keys)

    return [o for o in normalize_overrides(overrides) if not dropped(o[2:].split("=", 1)[0])]


def resolve_stages(stages: Sequence[str] | None, cfg: Config) -> list[str]:
    """The stages a run trains (default: the recipe's ``train.stages``), each known and at most once."""
    chosen: list[str] = list(stages) if stages else [str(s) for s in cfg.train.stages]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"stages {chosen}: each at most once, from {list(STAGES)}")
    return chosen
