"""The config tree: recipes, dotted overrides, every error, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from captioning.config import (
    Config,
    ConfigError,
    XeStageConfig,
    apply_overrides,
    config_warnings,
    describe_config,
    iter_fields,
    list_recipes,
    load_config,
    load_recipe,
    parse_overrides,
    valid_keys,
)

RECIPES = ["coco", "demo", "flickr30k", "flickr8k"]


def test_all_recipes_present() -> None:
    assert set(RECIPES) <= set(list_recipes())


def test_every_field_has_a_one_line_doc() -> None:
    for info in iter_fields():
        assert info.doc, f"{info.key} has no doc"
        assert "\n" not in info.doc, f"{info.key}'s doc is not one line"


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.xe.epochs = 1  # type: ignore[misc]


def test_position_specific_defaults() -> None:
    cfg = Config()
    assert cfg.train.xe.fine_tune_encoder is False
    assert cfg.train.finetune.fine_tune_encoder is True
    # seed 004's numbers
    assert cfg.train.xe.lr_decoder == 4e-4 and cfg.train.xe.lr_encoder == 1e-4
    assert cfg.data.min_word_freq == 5 and cfg.data.max_caption_len == 50
    assert cfg.model.encoder == "resnet101" and cfg.model.encoded_image_size == 14


@pytest.mark.parametrize("recipe", [None, *RECIPES])
def test_json_round_trip(recipe: str | None) -> None:
    cfg = load_config(recipe)
    text = cfg.to_json()
    again = Config.from_json(text)
    assert again == cfg
    assert again.to_json() == text
    assert isinstance(again.train.stages, tuple)


def test_round_trip_keeps_none_and_tuples() -> None:
    cfg = load_config(
        None, ["--data.restval_split=none", "--train.stages=xe,scst", "--model.encoder_weights=none"]
    )
    assert cfg.data.restval_split is None and cfg.model.encoder_weights is None
    assert cfg.train.stages == ("xe", "scst")
    assert Config.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_override_defaults_only(recipe: str) -> None:
    """Every key a recipe sets exists and differs from the default (no restated defaults)."""
    import tomllib

    from captioning.config import config_dir

    data = tomllib.loads((config_dir() / f"{recipe}.toml").read_text())

    def leaves(node: dict, prefix: str = "") -> list[tuple[str, object]]:
        out = []
        for k, v in node.items():
            if isinstance(v, dict):
                out += leaves(v, f"{prefix}{k}.")
            else:
                out.append((f"{prefix}{k}", v))
        return out

    defaults = Config().to_dict()
    cfg = load_recipe(recipe).to_dict()
    for key, _value in leaves(data):
        node_d, node_c = defaults, cfg
        for part in key.split("."):
            node_d, node_c = node_d[part], node_c[part]
        assert node_c != node_d, f"{recipe}.toml restates the default of {key}"
    assert load_recipe(recipe).recipe == recipe


def test_demo_recipe_is_cpu_sized() -> None:
    cfg = load_recipe("demo")
    assert cfg.data.dataset == "synthetic"
    assert cfg.model.encoder == "resnet18" and cfg.model.encoder_weights is None
    assert cfg.train.precision == "fp32"
    assert config_warnings(cfg) == []


def test_dotted_overrides_both_forms() -> None:
    cfg = load_config(
        "demo", ["--train.xe.lr_decoder=4e-4", "--model.encoder", "resnet34", "--eval.spice=true"]
    )
    assert cfg.train.xe.lr_decoder == 4e-4
    assert cfg.model.encoder == "resnet34"
    assert cfg.eval.spice is True
    # the rest of the recipe is kept
    assert cfg.data.dataset == "synthetic"


def test_int_widens_to_float_but_not_the_reverse() -> None:
    assert load_config(None, ["--train.xe.lr_decoder=1"]).train.xe.lr_decoder == 1.0
    with pytest.raises(ConfigError, match="expects an int"):
        load_config(None, ["--train.xe.epochs=1.5"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--train.xe.lr_decodr=1e-4"],
            r"unknown config key 'train.xe.lr_decodr' \(did you mean train.xe.lr_decoder",
        ),
        (["--nope.x=1"], r"valid keys: recipe, seed, data.dataset"),
        (["--train.xe=1"], r"'train.xe' is a section, not a value; its keys: train.xe.epochs"),
        (["--train.xe.epochs=abc"], r"--train.xe.epochs expects an int, got 'abc'"),
        (["--train.xe.lr_decoder=fast"], r"--train.xe.lr_decoder expects a float"),
        (["--eval.spice=maybe"], r"--eval.spice expects a bool"),
        (["--model.arch=transformer"], r"--model.arch must be one of show_attend_tell, show_tell, fc"),
        (["--train.stages=xe,rl"], r"must be one of xe, finetune, scst; got 'rl'"),
        (["--train.xe.batch_size=big"], r"--train.xe.batch_size expects int \| none"),
        (["--data.shards.jpeg_quality=101"], r"data.shards.jpeg_quality = 101 is above its maximum 100"),
        (["--model.dropout=-0.1"], r"model.dropout = -0.1 is below its minimum 0.0"),
        (["--train.xe.epochs"], r"override --train.xe.epochs has no value"),
        (["train.xe.epochs=3"], r"expected an override like --train.xe.lr_decoder=4e-4"),
        (["--seed=1", "--seed=2"], r"override --seed given twice"),
    ],
)
def test_override_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, argv)


def test_unknown_key_message_lists_every_valid_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--bogus=1"])
    for key in valid_keys():
        assert key in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"trian": {}}, r"unknown config key 'trian'"),
        (
            {"train": {"xe": {"epoch": 3}}},
            r"unknown config key 'train.xe.epoch' \(did you mean train.xe.epochs",
        ),
        ({"train": {"xe": {"epochs": "3"}}}, r"train.xe.epochs expects an int, got '3'"),
        ({"train": {"xe": {"epochs": True}}}, r"train.xe.epochs expects an int, got True"),
        ({"eval": {"spice": 1}}, r"eval.spice expects a bool"),
        ({"train": {"stages": "xe"}}, r"train.stages expects a list"),
        ({"train": 3}, r"'train' is a section; expected a table"),
        (
            {"data": {"synthetic": {"style": "voc"}}},
            r"data.synthetic.style must be one of 'coco', 'flickr8k', 'flickr30k'",
        ),
    ],
)
def test_from_dict_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(data)


def test_recipe_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train.xe]\nepochs = 'three'\n")
    with pytest.raises(ConfigError, match=r"bad.toml: train.xe.epochs expects an int"):
        load_recipe(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match=r"broken.toml: invalid TOML"):
        load_recipe(broken)
    with pytest.raises(ConfigError, match=r"unknown recipe 'nosuch'; available: coco, demo"):
        load_recipe("nosuch")
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_recipe_from_path_and_config_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.toml").write_text("seed = 7\n[model]\nencoder = 'resnet50'\n")
    cfg = load_recipe(tmp_path / "mine.toml")
    assert cfg.seed == 7 and cfg.model.encoder == "resnet50" and cfg.recipe == "mine"
    monkeypatch.setenv("CAPTIONING_CONFIG_DIR", str(tmp_path))
    assert list_recipes() == ["mine"]
    assert load_config("mine").seed == 7


def test_from_json_errors() -> None:
    with pytest.raises(ConfigError, match="config JSON is invalid"):
        Config.from_json("{not json")
    with pytest.raises(ConfigError, match="must be an object"):
        Config.from_json("[1, 2]")


def test_parse_overrides_keeps_text() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key .a\.b."):
        parse_overrides(["--a.b=1"])
    assert parse_overrides(["--seed=1", "--eval.split", "test"]) == {"seed": "1", "eval.split": "test"}


def test_apply_overrides_typed() -> None:
    cfg = apply_overrides(Config(), {"data.loader.num_workers": "0", "train.scst.baseline": "greedy"})
    assert cfg.data.loader.num_workers == 0 and cfg.train.scst.baseline == "greedy"


def test_replace_and_fingerprint() -> None:
    base = Config()
    other = base.replace({"train.xe.epochs": 3})
    assert other.train.xe.epochs == 3 and base.train.xe.epochs == 20
    assert base.fingerprint("data") == other.fingerprint("data")
    assert base.fingerprint() != other.fingerprint()
    assert base.fingerprint("train.xe") != other.fingerprint("train.xe")


def test_warnings_for_options_that_do_nothing() -> None:
    cfg = load_config(
        None, ["--train.xe.lr_encoder=1e-3", "--data.synthetic.num_train=5", "--train.stages=xe"]
    )
    warnings = config_warnings(cfg)
    assert any("train.xe.lr_encoder is set but train.xe.fine_tune_encoder is false" in w for w in warnings)
    assert any("data.synthetic.* is set" in w for w in warnings)
    assert config_warnings(Config()) == []
    # the same option is fine where it does something
    assert (
        config_warnings(
            load_config(None, ["--train.xe.fine_tune_encoder=true", "--train.xe.lr_encoder=1e-3"])
        )
        == []
    )


def test_describe_lists_every_key_with_doc() -> None:
    text = describe_config(load_recipe("demo"))
    for info in iter_fields():
        assert f"{info.key} : " in text
    assert 'model.encoder : {resnet18, resnet34, resnet50, resnet101, resnet152} = "resnet18"' in text


def test_stage_section_type() -> None:
    assert isinstance(Config().train.finetune, XeStageConfig)
    assert json.loads(Config().to_json())["train"]["finetune"]["fine_tune_encoder"] is True


# --- flow parameters and the stage list ---------------------------------------------------------------


def test_normalize_overrides() -> None:
    from captioning.config import normalize_overrides

    assert normalize_overrides(None) == []
    assert normalize_overrides(["a.b=1", "--c.d=x=y"]) == ["--a.b=1", "--c.d=x=y"]


def test_without_keys_drops_train_stages_only() -> None:
    from captioning.config import without_keys

    given = ["train.stages=xe", "--train.stages=xe,scst", "train.xe.epochs=2", "--train.stages_extra=1"]
    assert without_keys(given, "train.stages") == ["--train.xe.epochs=2", "--train.stages_extra=1"]
    assert without_keys(None, "train.stages") == []
    # A section drops every key under it, and only those.
    local = ["--data.local.karpathy_json=a.json", "--data.localish=1", "--data.dataset=local"]
    assert without_keys(local, "data.local", "data.dataset") == ["--data.localish=1"]


def test_resolve_stages() -> None:
    from captioning.config import STAGES, resolve_stages

    cfg = load_config("demo")
    assert resolve_stages(None, cfg) == list(STAGES) == ["xe", "finetune", "scst"]
    assert resolve_stages([], cfg) == ["xe", "finetune", "scst"]
    only_xe = load_config("demo", ["--train.stages=xe"])
    assert resolve_stages(None, only_xe) == ["xe"]
    assert resolve_stages(["scst", "xe"], cfg) == ["scst", "xe"]


@pytest.mark.parametrize("stages", [["xe", "rl"], ["xe", "xe"], ["XE"]])
def test_resolve_stages_rejects_unknown_and_repeated(stages: list[str]) -> None:
    from captioning.config import resolve_stages

    with pytest.raises(ConfigError, match="each at most once"):
        resolve_stages(stages, load_config("demo"))
