"""The plan table of `bench/RESULTS.md` covers every shipped recipe, and each recipe's default layout is the one
its plan ranked first on a v5p-128 (`bench/plans/`, written by `bench/plan_recipes.py` with libtpu; nothing
here compiles)."""

import json
import os
import sys

import pytest

from crate_jax.models.config import BlockConfig
from crate_jax.parallel.mesh import resolve_shape
from crate_jax.train import config_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
import plan_recipes  # noqa: E402

PLANS = os.path.join(REPO, "bench", "plans")

# Recipes whose default is not among the plan's best rows, and why. The best rows: every fitting layout within
# 1 % of the fastest bound (e.g. IN-21K L/8: fsdp 64 and data 8 x fsdp 8 both at 327.2 ms, remat none).
KEPT = {  # recipe -> (why the default differs, the config arguments that select the plan's best on a v5p-128)
    "lm_B": ("nanoGPT's recipe is for one 8-GPU node: its 480 sequences do not divide over 64 data-parallel "
             "chips", "mesh=data+tensor:2,remat=dots"),
}
TIE = 1.01
_DEFAULT_REMAT = BlockConfig.__dataclass_fields__["remat"].default


def _plan(recipe, topology="v5p-128"):
    path = os.path.join(PLANS, f"{recipe}__{topology}.json")
    return json.load(open(path)) if os.path.exists(path) else None


def _default_layout(recipe, chips, more=""):
    config, _ = plan_recipes.RECIPES[recipe]
    c = config_cli.load(os.path.join(REPO, config.format(vocab="VOCAB.txt")) + ("," + more if more else ""))
    shape = resolve_shape({k: v for k, v in dict(c.mesh).items() if k != "num_devices"}, chips)
    remats = {v for k, v in _remats(c.model)} or {_DEFAULT_REMAT}  # no key: the block option's default
    return dict(zip(("data", "fsdp", "tensor"), shape)), remats, c.get("microbatches", 1)


def _remats(node, prefix="model"):
    for k in list(node.keys()):
        if k == "remat":
            yield prefix, node[k]
        elif hasattr(node[k], "keys"):
            yield from _remats(node[k], f"{prefix}.{k}")


def test_every_recipe_has_a_plan_on_a_v5p_128():
    missing = [r for r in plan_recipes.RECIPES if _plan(r) is None]
    assert not missing, f"no bench/plans/<recipe>__v5p-128.json for {missing}: run bench/plan_recipes.py plan"


@pytest.mark.parametrize("recipe", sorted(plan_recipes.RECIPES))
def test_default_layout_is_the_plan_s_best(recipe):
    doc = _plan(recipe)
    if doc is None:
        pytest.fail(f"{recipe}: no plan on a v5p-128")
    fitting = [r for r in doc["plan"] if r["fits"]]
    assert fitting, f"{recipe}: nothing fits on a v5p-128"
    mesh, remats, micro = _default_layout(recipe, 64, KEPT[recipe][1] if recipe in KEPT else "")
    key = (mesh["data"], mesh["fsdp"], mesh["tensor"], *sorted(remats), micro)
    chosen = next((r for r in fitting if (r["data"], r["fsdp"], r["tensor"], r["remat"], r["microbatches"]) == key),
                  None)
    best = fitting[0]
    assert chosen is not None and chosen["bound_s"] <= TIE * best["bound_s"], (
        f"{recipe}: the config's layout (data, fsdp, tensor, remat, microbatches) = {key} is not among the plan's "
        f"best on a v5p-128 ({best['name']}, {1e3 * best['bound_s']:.1f} ms)")


def test_the_table_has_a_row_per_recipe_and_slice():
    text = plan_recipes.table(PLANS)
    for recipe in plan_recipes.RECIPES:
        assert f"| {recipe} | v5p-128 | **" in text, recipe


def _row(data, fsdp, remat, bound, fits=True):
    return dict(data=data, fsdp=fsdp, tensor=1, remat=remat, microbatches=1, name=f"{data}x{fsdp} {remat}", fits=fits,
                total_bytes=1, hbm_bytes=2, bound_s=bound if fits else None, binding="memory", mfu=0.5, compile_s=1.0,
                error=None)


def test_plan_add_ranks_new_layouts_with_the_old_and_replaces_a_recompiled_one():
    doc = dict(topology="v6e-256", config="c.py", plan=[_row(1, 256, "none", 0.034), _row(256, 1, "none", 0.042)])
    over = [_row(32, 8, "dots", None, fits=False), _row(32, 8, "full", None, fits=False)]
    over[0]["total_bytes"], over[1]["total_bytes"] = 300, 200
    new = dict(topology="v6e-256", config="c.py",
               plan=[_row(1, 256, "dots", 0.033), _row(256, 1, "none", 0.040)] + over)
    merged = plan_recipes.merge(doc, new)
    assert [(r["data"], r["remat"], r["bound_s"]) for r in merged["plan"]] == [
        (1, "dots", 0.033), (1, "none", 0.034), (256, "none", 0.040), (32, "full", None), (32, "dots", None)]
    with pytest.raises(ValueError, match="cannot merge a plan of c.py on v5p-128"):
        plan_recipes.merge(doc, dict(new, topology="v5p-128"))
    with pytest.raises(SystemExit):
        plan_recipes.main(["smallest", "--add"])


def test_plan_add_merges_a_run_into_the_recipe_s_file_and_reports_one_it_cannot(tmp_path, monkeypatch, capsys):
    path = tmp_path / "in21k_B16__v6e-256.json"
    path.write_text(json.dumps(dict(topology="v6e-256", config="c.py", plan=[_row(1, 256, "none", 0.034)])))

    def fake_aot(recipe, topology, mode, out, vocab, more, topo="v6e-256"):
        with open(out, "w") as f:
            json.dump(dict(topology=topo, config="c.py", plan=[_row(1, 256, "dots", 0.033)]), f)
        return 0

    monkeypatch.setattr(plan_recipes, "_aot", fake_aot)
    assert plan_recipes.run("plan", "v6e-256", str(tmp_path), ["in21k_B16"], [], add=False) == 0
    assert len(json.loads(path.read_text())["plan"]) == 1  # without --add an existing plan is kept as it is
    assert plan_recipes.run("plan", "v6e-256", str(tmp_path), ["in21k_B16"], [], add=True) == 0
    assert [r["remat"] for r in json.loads(path.read_text())["plan"]] == ["dots", "none"]
    monkeypatch.setattr(plan_recipes, "_aot", lambda *a: fake_aot(*a, topo="v5p-128"))
    assert plan_recipes.run("plan", "v6e-256", str(tmp_path), ["in21k_B16"], [], add=True) == 1
    assert "error:" in capsys.readouterr().out and len(json.loads(path.read_text())["plan"]) == 2
