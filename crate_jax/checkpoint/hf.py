"""Hugging Face-style model directories: `model.safetensors` + `config.json` (+ tokenizer files,
`preprocess.json`, `class_names.json`, `README.md`), written by `export --format hf` and read back bit for
bit by `load_hf` (and `crate_jax.load`).

Every model kind is stored with its parameter paths joined by '.' and `config.json` holding
`model_type: "crate_jax"` and the crate_jax config under `crate_jax`. A GPT-2 language model is written
in the official Hugging Face GPT-2 layout instead (`model_type: "gpt2"`, `GPT2LMHeadModel` tensor names
from `crate_jax.weights.gpt`, the tied `lm_head.weight` left out as `save_pretrained` does), so that
`transformers` can read it; its config.json also carries the crate_jax config, so our own loader restores
every field (padded vocabulary, dtype). A GPT-2 directory from elsewhere is read through the `gpt2-hf`
importer.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from crate_jax.models import registry

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
MODEL_TYPE = "crate_jax"

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class HFError(ValueError):
    """A directory that is not a readable Hugging Face-style model; the message names the file."""


def is_hf_dir(path) -> bool:
    path = Path(path)
    return (path / CONFIG_JSON).is_file() and (path / WEIGHTS).is_file()


def is_official_gpt2(cfg) -> bool:
    return registry.kind_of(cfg) == "lm" and cfg.model == "gpt2"


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_names(params: dict) -> dict[str, np.ndarray]:
    """'.'-joined parameter paths -> arrays (keys of any type become their text)."""
    import jax
    return {_name(path): np.ascontiguousarray(np.asarray(v)) for path, v in jax.tree_util.tree_leaves_with_path(params)}


def tensors_and_config(cfg, params: dict, *, eot_id: int | None = None) -> tuple[dict, dict]:
    """`(tensors, config.json dict)` of the Hugging Face-style directory of `(cfg, params)`."""
    stored = {"kind": registry.kind_of(cfg), "config": cfg.to_dict()}
    if is_official_gpt2(cfg):
        from crate_jax.weights import gpt
        tensors = gpt.from_params("gpt2-hf", params, cfg)
        tensors.pop("lm_head.weight")  # tied to transformer.wte.weight; save_pretrained leaves it out too
        config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.table_size,
                  "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.width, "n_layer": cfg.depth,
                  "n_head": cfg.num_heads, "n_inner": cfg.mlp_dim or None, "activation_function": "gelu_new",
                  "layer_norm_epsilon": cfg.ln_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.emb_dropout,
                  "attn_pdrop": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True,
                  "torch_dtype": cfg.param_dtype, MODEL_TYPE: stored}
        if eot_id is not None:
            config["bos_token_id"] = config["eos_token_id"] = int(eot_id)
        return tensors, config
    official = official_bert_format(cfg)
    if official is not None:  # the pull request's CRATE-BERT / Hugging Face BERT / RoBERTa layout
        from crate_jax.weights import bert
        tensors = {k: v for k, v in bert.from_params(official, params, cfg).items() if ".decoder." not in k}
        model_type = {"crate-bert-hf": "crate", "bert-hf": "bert", "roberta-hf": "roberta"}[official]
        head = "CrateForMaskedLM" if official == "crate-bert-hf" else \
            ("BertForMaskedLM" if official == "bert-hf" else "RobertaForMaskedLM")
        config = {"model_type": model_type, "architectures": [head] if cfg.mlm_head else [],
                  "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
                  "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.dict_size,
                  "max_position_embeddings": cfg.max_positions, "type_vocab_size": cfg.type_vocab_size,
                  "layer_norm_eps": cfg.layer_norm_eps, "pad_token_id": cfg.pad_token_id, "hidden_act": "gelu",
                  "torch_dtype": cfg.param_dtype, MODEL_TYPE: stored}
        return tensors, config
    tensors = flat_names(params)
    return tensors, {"model_type": MODEL_TYPE, "architectures": [stored["kind"]], MODEL_TYPE: stored}


def official_bert_format(cfg) -> str | None:
    """The official layout a masked-LM encoder is exported in (`crate_jax.weights.bert`), or None when the
    config holds something that layout cannot express (then the generic layout is used)."""
    if registry.kind_of(cfg) != "bert" or not cfg.mlm_head or cfg.num_labels:
        return None
    from crate_jax.weights import bert
    fmt = "crate-bert-hf" if cfg.model == "crate_bert" else ("roberta-hf" if cfg.positions == "roberta" else "bert-hf")
    return None if bert.layout_problems(fmt, cfg) else fmt


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save
    Path(path).write_bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                metadata={"format": "pt", **(metadata or {})}))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` file, bfloat16 included (`safetensors.numpy` cannot return those)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            data = f.read()
    except (OSError, ValueError, struct.error) as e:
        raise HFError(f"{path}: not a readable safetensors file ({e})") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _ST_DTYPES:
            raise HFError(f"{path}: tensor {name} has dtype {info.get('dtype')}, which crate_jax does not read")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], _ST_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def read_config(directory) -> dict:
    path = Path(directory) / CONFIG_JSON
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: not a readable JSON config ({e})") from e


def config_and_params(directory: str | os.PathLike) -> tuple[object, dict]:
    """`(cfg, params)` (nested numpy tree) of a directory written by `export --format hf`, or of an official
    Hugging Face GPT-2 directory."""
    directory = Path(directory)
    config = read_config(directory)
    tensors = read_safetensors(directory / WEIGHTS)
    stored = config.get(MODEL_TYPE)
    if config.get("model_type") == "gpt2":
        from crate_jax.weights import gpt
        if stored:
            cfg = registry.config_from_dict(stored["kind"], stored["config"])
            tensors = gpt.normalise_names("gpt2-hf", tensors)
            gpt.check_layout("gpt2-hf", tensors, cfg, str(directory / WEIGHTS))
            return cfg, gpt.to_params("gpt2-hf", tensors, cfg)
        return gpt.import_lm_tensors("gpt2-hf", tensors, heads=config.get("n_head"), source=str(directory / WEIGHTS))
    official = {"crate": "crate-bert-hf", "bert": "bert-hf", "roberta": "roberta-hf"}.get(config.get("model_type"))
    if official is not None and isinstance(stored, dict):
        from crate_jax.weights import bert
        cfg = registry.config_from_dict(stored["kind"], stored["config"])
        tensors = bert.normalise_names(official, tensors)
        bert.check_layout(official, tensors, cfg, str(directory / WEIGHTS))
        return cfg, bert.to_params(official, tensors, cfg)
    if config.get("model_type") != MODEL_TYPE or not isinstance(stored, dict):
        raise HFError(f"{directory / CONFIG_JSON}: model_type {config.get('model_type')!r}; crate_jax reads its own "
                      f"exports (model_type {MODEL_TYPE!r}) and Hugging Face GPT-2 directories ('gpt2')")
    cfg = registry.config_from_dict(stored["kind"], stored["config"])
    return cfg, unflatten_like(cfg, tensors, directory / WEIGHTS)


def unflatten_like(cfg, tensors: dict[str, np.ndarray], source) -> dict:
    """The nested parameter tree of `cfg`'s model with the arrays of `tensors` ('.'-joined paths), checked:
    every name present, none extra, every shape equal."""
    import jax
    from flax import nnx
    abstract = nnx.to_pure_dict(nnx.state(registry.abstract(cfg), nnx.Param))
    shapes = {_name(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    bad = [f"{k} {tuple(tensors[k].shape)} != {shapes[k]}" for k in shapes if k in tensors
           and tuple(tensors[k].shape) != shapes[k]]
    if missing or extra or bad:
        raise HFError(f"{source} does not match its config.json: " + "; ".join(
            p for p in (f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                        f"mis-shaped {bad[:5]}" if bad else "") if p))
    return jax.tree_util.tree_map_with_path(lambda p, _: tensors[_name(p)], abstract)
