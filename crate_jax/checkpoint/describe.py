"""What a bundle tells its recipient besides the weights: the preprocessing (`preprocess.json`), the class
names (`class_names.json`), the tokenizer files and a model card (`README.md`).

Everything here is derived from what is known: the model config (resolution, channels, context length),
and for a training run its `config.json` (the data source, eval preprocessing, tokenizer, steps) and
`final_metrics.json`. Nothing is guessed: a fact that is not known is left out of the card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from crate_jax.models import registry

log = logging.getLogger(__name__)

PREPROCESS_JSON = "preprocess.json"
CLASS_NAMES_JSON = "class_names.json"
CARD = "README.md"
EVAL_CROP_FRACTION = 0.875  # the data loader's default short side for eval: image_size / 0.875
MEAN = (0.485, 0.456, 0.406)  # crate_jax.models.preprocess: every image model takes ImageNet-normalised input
STD = (0.229, 0.224, 0.225)
REPORTED_TRAIN_METRICS = ("train/loss", "train/top1")  # the rest of final_metrics.json is throughput and health


def image_preprocess(cfg, data_cfg: dict | None = None) -> dict | None:
    """The image half of `preprocess.json` for model `cfg` (None for text-only models): the training run's
    eval recipe when its data config is known, else the loader's default (short side to size / 0.875,
    centre crop)."""
    img = registry.image_config(cfg)
    if img is None:
        return None
    size = int(img.image_size)
    data_cfg = data_cfg or {}
    if data_cfg.get("augment") == "none":
        resize = {"resize": "resize", "resize_small": None}
    else:
        small = data_cfg.get("resize_small") or round(size / EVAL_CROP_FRACTION)
        resize = {"resize": "resize_small_centre_crop", "resize_small": int(small)}
    return {"size": size, "channels": int(getattr(img, "channels", 3)), **resize, "value_range": [0, 255],
            "scale": 1 / 255, "mean": list(MEAN), "std": list(STD), "layout": "NHWC"}


def text_preprocess(cfg, tokenizer_files: list[str]) -> dict | None:
    """The text half of `preprocess.json`: the tokenizer files (copied into the bundle), their kind, the
    longest input and the special tokens."""
    if not tokenizer_files:
        return None
    names = [Path(f).name for f in tokenizer_files]
    if registry.kind_of(cfg) == "bert":  # masked-LM encoders (crate_jax.models.bert)
        return {"tokenizer": names, "kind": "BPE or WordPiece of the source model", "max_length": int(cfg.max_tokens),
                "special_tokens": {"padding_id": int(cfg.pad_token_id)},
                "row_layout": "<s> pieces... </s> then padding (RoBERTa) / [CLS] ... [SEP] (BERT)"}
    if registry.inputs_of(cfg) == "tokens":
        from crate_jax.text.bpe import EOT
        return {"tokenizer": names, "kind": "byte-level BPE", "max_length": int(cfg.block_size),
                "special_tokens": {"end_of_text": EOT}}
    from crate_jax.text.tokenizer import CLS_TOKEN, UNK_TOKEN
    return {"tokenizer": names, "kind": "WordPiece (BERT vocab.txt)", "max_length": int(cfg.text.max_len),
            "special_tokens": {"cls": CLS_TOKEN, "unknown": UNK_TOKEN, "padding_id": 0},
            "row_layout": "[CLS] pieces... then 0 padding, no [SEP]"}


def preprocess_of(cfg, *, data_cfg: dict | None = None, tokenizer_files: list[str] = ()) -> dict:
    out = {"inputs": registry.inputs_of(cfg)}
    image = image_preprocess(cfg, data_cfg)
    if image:
        out["image"] = image
    text = text_preprocess(cfg, list(tokenizer_files))
    if text:
        out["text"] = text
    return out


# ------------------------------------------------------------------------------------------------------------
# A training run's facts
# ------------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def class_names_of_run(run_config: dict) -> list[str] | None:
    """Class names from the run's data source: digits / MNIST (0-9), an image folder's class directories,
    a TFDS dataset's label names (when it is prepared locally), or a zero-shot evaluator's class-name file
    (the synthetic scenes' `classes.json`). None when unknown."""
    data = run_config.get("data") or {}
    source = data.get("source")
    try:
        if source in ("digits", "mnist"):
            return [str(i) for i in range(10)]
        if source == "folder" and data.get("data_dir"):
            from crate_jax.data.images.classification import folder_classes
            return list(folder_classes(data["data_dir"], data.get("train_split") or "train"))
        if source == "tfds" and data.get("name"):
            return _tfds_names(data)
        for spec in (run_config.get("evals") or {}).values():
            if isinstance(spec, dict) and spec.get("type") == "zeroshot" and spec.get("classnames"):
                from crate_jax.eval.names import load_classnames
                return load_classnames(spec["classnames"])
    except (OSError, ValueError) as e:
        log.warning("class names of the run's data are not available (%s); the bundle will have none", e)
    return None


def _tfds_names(data: dict) -> list[str] | None:
    try:
        import tensorflow_datasets as tfds
        ds = tfds.data_source(data["name"], split=data.get("train_split") or "train", data_dir=data.get("data_dir"),
                              download=False)
        feature = ds.dataset_info.features[data.get("label_key") or "label"]
        return list(feature.names) if getattr(feature, "names", None) else None
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds when a dataset is not prepared here
        log.warning("TFDS label names of %s are not available here (%s)", data.get("name"), e)
        return None


def tokenizer_files_of_run(run_config: dict) -> list[Path]:
    """The tokenizer a run trained with: a language model's data directory's tokenizer, or a two-tower
    run's WordPiece `vocab.txt`."""
    data = run_config.get("data") or {}
    if data.get("dir"):
        try:
            from crate_jax.data.tokens.loader import TokenDataset
            return [Path(TokenDataset(data["dir"]).tokenizer_path)]
        except Exception as e:  # noqa: BLE001 - a moved or remote data directory: the bundle goes without
            log.warning("the run's tokenizer in %s is not readable (%s)", data["dir"], e)
            return []
    vocab = data.get("vocab")
    if vocab and Path(vocab).is_file():
        return [Path(vocab)]
    return []


def training_facts(run_config: dict | None, final_metrics: dict | None) -> dict:
    """The card's training section from a run's `config.json` and `final_metrics.json`."""
    facts = {}
    if run_config:
        data = run_config.get("data") or {}
        what = data.get("source") or ("token shards" if data.get("dir") else None)
        if what:
            facts["data"] = what + (f" ({data['name']})" if data.get("name") else "")
        for key, label in (("total_steps", "steps"), ("batch_size", "batch size"), ("task", "task")):
            if run_config.get(key) is not None:
                facts[label] = run_config[key]
        lr = (run_config.get("optim") or {}).get("lr")
        if lr is not None:
            facts["learning rate"] = lr
    if final_metrics:
        facts["final metrics"] = {k: v for k, v in sorted(final_metrics.items()) if isinstance(v, (int, float))
                                  and (k.startswith("eval/") or k in REPORTED_TRAIN_METRICS)}
    return facts


# ------------------------------------------------------------------------------------------------------------
# The model card
# ------------------------------------------------------------------------------------------------------------
def describe_model(cfg) -> str:
    kind = registry.kind_of(cfg)
    img = registry.image_config(cfg)
    if kind == "lm":
        return (f"{cfg.model} {cfg.variant} language model (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} "
                f"heads, vocabulary {cfg.vocab_size}, context {cfg.block_size} tokens)")
    if kind == "bert":
        return (f"{cfg.model} {cfg.variant} masked-LM encoder (width {cfg.width}, depth {cfg.depth}, {cfg.num_heads} "
                f"heads, vocabulary {cfg.vocab_size}, up to {cfg.max_tokens} tokens)")
    if img is None:  # another text model: what every config has
        return (f"{getattr(cfg, 'model', kind)} {getattr(cfg, 'variant', '')} {kind} model (width "
                f"{getattr(cfg, 'width', '?')}, depth {getattr(cfg, 'depth', '?')})")
    arch = f"{img.model} {img.variant}" if hasattr(img, "model") else f"CRATE-MAE {img.variant}"
    what = {"classifier": "image classifier" if getattr(cfg, "num_classes", 0) else "image backbone (no head)",
            "two_tower": "image-text two-tower model", "crate_mae": "masked autoencoder",
            "self_distill": "self-distillation (SimDINO) model"}.get(kind, f"{kind} model")
    return (f"{arch} {what} (width {img.width}, depth {img.depth}, {img.num_heads} heads, {img.patch_size} px "
            f"patches, {img.image_size} px input)")


def model_card(cfg, n_params: int, *, source: str = "", facts: dict | None = None, class_names=None,
               preprocess: dict | None = None) -> str:
    """`README.md` of a bundle from what is known. `facts` may hold `title`, `license`, `converted_with`
    (the importing command), `training` (from `training_facts`) and free `notes`."""
    facts = dict(facts or {})
    kind = registry.kind_of(cfg)
    lines = [f"# {facts.get('title') or describe_model(cfg)}", "",
             "A crate_jax bundle: the parameters (`params/`, Orbax) and the model config (`model.json`).", "",
             "## Model", "", f"- kind: `{kind}`", f"- architecture: {describe_model(cfg)}",
             f"- parameters: {n_params:,}", f"- parameter dtype: {_dtype_of(cfg)}"]
    if class_names:
        shown = ", ".join(map(str, class_names[:10])) + (", ..." if len(class_names) > 10 else "")
        lines.append(f"- classes: {len(class_names)} ({shown}; `class_names.json`)")
    if preprocess and "image" in preprocess:
        p = preprocess["image"]
        rule = (f"short side to {p['resize_small']} px, centre crop {p['size']} px" if p["resize_small"]
                else f"resize to {p['size']}x{p['size']} px")
        lines.append(f"- input: RGB images, {rule}, scaled to [0, 1], normalised with mean {p['mean']} and std "
                     f"{p['std']}, {p['layout']} (`preprocess.json`)")
    if preprocess and "text" in preprocess:
        t = preprocess["text"]
        lines.append(f"- text: {t.get('kind', 'the')} tokenizer ({', '.join(t['tokenizer'])} in this bundle)"
                     + (f", at most {t['max_length']} tokens" if t.get("max_length") else ""))
    lines += ["", "## Origin", ""]
    lines.append(f"- source: {source or 'not recorded'}")
    if facts.get("converted_with"):
        lines.append(f"- converted with: `{facts['converted_with']}`")
    lines.append(f"- licence of the weights: {facts.get('license') or 'not stated (check the source weights)'}")
    training = facts.get("training") or {}
    if training:
        lines += ["", "## Training", ""]
        for k, v in training.items():
            if k == "final metrics":
                continue
            lines.append(f"- {k}: {v}")
        metrics = training.get("final metrics") or {}
        if metrics:
            lines += ["", "| final metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    for note in facts.get("notes") or []:
        lines += ["", note]
    lines += ["", "## Use", "", "```python", "import crate_jax", "config, model = crate_jax.load(\"THIS_DIRECTORY\")",
              "```", ""]
    if kind in ("classifier",) and class_names:
        lines += ["```sh", "python -m crate_jax.predict --checkpoint THIS_DIRECTORY --images photo.jpg --output "
                  "top5.json", "```", ""]
    if kind == "lm":
        lines += ["```sh", "python -m crate_jax.generate --checkpoint THIS_DIRECTORY --prompt \"Hello\"", "```", ""]
    return "\n".join(lines)


def _dtype_of(cfg) -> str:
    img = registry.image_config(cfg)
    return getattr(img if img is not None else cfg, "param_dtype", "float32")
