"""Block options are declared once (`BlockConfig`): every model config holds one, builders and `from_dict` take
the options flat or nested, and the flat `model.json` of older bundles still loads to the same config."""

import dataclasses

import pytest

from crate_jax.models.bert import BertConfig, bert_config
from crate_jax.errors import ConfigError
from crate_jax.models.config import BLOCK_OPTIONS, BlockConfig, ModelConfig, model_config
from crate_jax.models.lm import LMConfig, lm_config
from crate_jax.models.mae import MAEConfig, mae_config
from crate_jax.models.self_distill import SelfDistillConfig, self_distill_config
from crate_jax.models.text import TextConfig, text_config
from crate_jax.models.two_tower import TwoTowerConfig, two_tower_config

CONFIGS = {
    "classifier": lambda: model_config("crate_alpha", "Ti/16", image_size=32, remat="full", odl_steps=3),
    "text": lambda: text_config("mu", scan=True),
    "lm": lambda: lm_config("gpt2", "small", width=64, depth=2, num_heads=2, dropout=0.1),
    "crate_gpt": lambda: lm_config("crate_gpt", "crate", width=64, depth=2, num_heads=2),
    "bert": lambda: bert_config("bert", "base", width=64, depth=2, num_heads=2),
    "crate_bert": lambda: bert_config("crate_bert", "base", width=64, depth=2, num_heads=2, lmbda=0.2),
    "mae": lambda: mae_config("T/8", image_size=32, attention="explicit"),
}


def flat(d: dict) -> dict:
    """The pre-BlockConfig `model.json`: block options beside the config's own fields."""
    d = dict(d)
    d.update(d.pop("block"))
    return d


def test_no_config_restates_a_block_option():
    for cls in (ModelConfig, TextConfig, LMConfig, BertConfig, MAEConfig, SelfDistillConfig, TwoTowerConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & set(BLOCK_OPTIONS), (cls.__name__, sorted(names & set(BLOCK_OPTIONS)))
    for cls in (ModelConfig, TextConfig, LMConfig, BertConfig, MAEConfig):
        assert {f.name: f.type for f in dataclasses.fields(cls)}["block"] in (BlockConfig, "BlockConfig")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nested_and_flat_json_load_to_the_same_config(name):
    cfg = CONFIGS[name]()
    d = cfg.to_dict()
    assert set(d["block"]) == set(BLOCK_OPTIONS)
    assert not set(d) & set(BLOCK_OPTIONS)
    assert type(cfg).from_dict(d) == cfg
    assert type(cfg).from_dict(flat(d)) == cfg
    assert cfg.block.width == cfg.width and cfg.remat == cfg.block.remat  # options read through the config
    again = cfg.replace(remat="dots", scan=True)
    assert (again.block.remat, again.block.scan) == ("dots", True) and again.replace(remat=cfg.remat,
                                                                                    scan=cfg.scan) == cfg


def test_family_rules_hold_for_flat_and_nested_input():
    assert CONFIGS["lm"]().block.causal and CONFIGS["lm"]().block.mlp_dim == 4 * 64
    assert CONFIGS["crate_gpt"]().block.attn_out_bias and CONFIGS["crate_gpt"]().block.mlp_dim == 0
    assert not CONFIGS["bert"]().block.causal and CONFIGS["bert"]().block.ln_eps == 1e-12
    assert CONFIGS["crate_bert"]().block.ln_eps == 1e-5 and CONFIGS["crate_bert"]().block.lmbda == 0.2
    assert (CONFIGS["mae"]().block.lmbda, CONFIGS["mae"]().block.ln_eps) == (0.5, 1e-5)
    assert text_config("mu", model="crate_alpha").block.mlp_dim == 0


def test_old_crate_bert_bundle_eps_name_still_loads():
    cfg = CONFIGS["crate_bert"]()
    old = flat(cfg.to_dict())
    old["block_ln_eps"] = old.pop("ln_eps")
    assert BertConfig.from_dict(old) == cfg


def test_nested_configs_round_trip():
    for cfg in (two_tower_config("crate_alpha", "Ti/16", image_size=32, text=text_config("mu"), out_dim=16),
                self_distill_config("vit", "Ti/16", image_size=32, head_hidden=32, head_dim=16, remat="full")):
        d = cfg.to_dict()
        assert type(cfg).from_dict(d) == cfg


def test_unknown_and_bad_block_options_name_the_key():
    with pytest.raises(ConfigError, match=r"did you mean 'remat' for 'remta'"):
        model_config("vit", "Ti/16", remta="full")
    with pytest.raises(ConfigError, match=r"language-model config field 'remat'"):
        lm_config("gpt2", "small", remat="sometimes")
    with pytest.raises(ConfigError, match=r"unknown BERT block config keys \[.wdith.\] \(did you mean .width."):
        BertConfig.from_dict({**CONFIGS["bert"]().to_dict(), "block": {"width": 64, "wdith": 3}})
