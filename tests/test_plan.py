"""`aot --plan`: the candidate layouts of a slice, the greedy cheapest-remat search, the ranking, and one real plan
compiled for a simulated 4-device CPU mesh (no libtpu)."""

import json
import os

import pytest

from train_helpers import tiny_config

from crate_jax import aot
from crate_jax.parallel import plan as P

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_splits_are_data_fsdp_and_hybrids_that_divide_the_batch():
    assert [(l.data, l.fsdp, l.tensor) for l in P.splits(64, 4096)] == [(64, 1, 1), (8, 8, 1), (1, 64, 1)]
    assert [(l.data, l.fsdp) for l in P.splits(64, 4096, hybrids=(4, 16, 3))] == [(64, 1), (16, 4), (4, 16), (1, 64)]
    assert [(l.data, l.fsdp, l.tensor) for l in P.splits(8, 64, tensors=(1, 4), width=96)] == [
        (8, 1, 1), (1, 8, 1), (2, 1, 4), (1, 2, 4)]
    assert P.splits(8, 12) == []  # 12 examples do not divide over 8 data-parallel chips
    assert P.splits(8, 64, tensors=(3,)) == []


def test_search_stops_at_the_cheapest_remat_that_fits_and_ranks_by_bound():
    need = {"none": 40, "dots": 20, "full": 12}  # GiB per chip, halved by FSDP's parameter sharding
    compiled = []

    def fake(layout):
        compiled.append(layout)
        gib = need[layout.remat] * (0.5 if layout.fsdp > 1 else 1.0) / layout.microbatches
        return P.Measured(layout, total_bytes=gib * 2**30, hbm_bytes=16 * 2**30, binding="compute",
                          bound_s=0.1 * {"none": 1.0, "dots": 1.1, "full": 1.3}[layout.remat] + 0.01 * layout.fsdp)

    ranked = P.search(fake, [P.Layout(4, 1), P.Layout(1, 4)], global_batch=64)
    assert [(l.fsdp, l.remat, l.microbatches) for l in compiled] == [(1, "none", 1), (1, "dots", 1), (1, "full", 1),
                                                                     (4, "none", 1), (4, "dots", 1), (4, "full", 1)]
    # the best split had tried every remat; the close FSDP split is compiled at the remat that won too
    assert [m.fits for m in ranked] == [True, True, True, False, False, False]
    assert (ranked[0].layout.fsdp, ranked[0].layout.remat) == (1, "full")  # 0.14 s beats FSDP + dots at 0.15 s
    text = P.table(ranked)
    assert text.splitlines()[2].startswith("| 1 | data 4, remat full |") and "| no |" in text.splitlines()[-1]


def test_search_tries_the_other_remats_on_the_best_split():
    """Memory-bound: saving every activation (remat none) reads more bytes than recomputing them (full)."""
    fake = lambda l: P.Measured(l, total_bytes=2**30, hbm_bytes=16 * 2**30, binding="memory",
                                bound_s={"none": 0.30, "dots": 0.25, "full": 0.20}[l.remat] + 0.01 * l.fsdp)
    ranked = P.search(fake, [P.Layout(4, 1), P.Layout(1, 4)], global_batch=64)
    assert [(m.layout.fsdp, m.layout.remat) for m in ranked] == [(1, "full"), (4, "full"), (1, "dots"), (1, "none"),
                                                                 (4, "none")]


def test_search_compiles_the_close_splits_at_the_winning_remat():
    """The split that was second at remat none wins at remat full; a split far behind is not recompiled."""
    def bound(l):
        if l.fsdp == 2:
            return 1.0 if l.remat == "none" else 0.5
        return {"none": 0.30, "dots": 0.25, "full": 0.20}[l.remat] + (0.01 if l.remat == "none" else -0.01) * l.fsdp
    compiled = []

    def fake(l):
        compiled.append(l)
        return P.Measured(l, total_bytes=2**30, hbm_bytes=16 * 2**30, binding="memory", bound_s=bound(l))
    ranked = P.search(fake, [P.Layout(4, 1), P.Layout(1, 4), P.Layout(2, 2)], global_batch=64)
    assert (ranked[0].layout.fsdp, ranked[0].layout.remat) == (4, "full")
    assert P.Layout(2, 2, remat="full") not in compiled and len(compiled) == len(set(compiled)) == 6


def test_search_adds_microbatches_when_no_remat_fits():
    fake = lambda l: P.Measured(l, total_bytes=40 / l.microbatches * 2**30, hbm_bytes=16 * 2**30, bound_s=1.0,
                                binding="memory")
    ranked = P.search(fake, [P.Layout(8, 1)], global_batch=64)
    assert {m.layout.microbatches for m in ranked if m.fits} == {4}


@pytest.mark.slow
def test_plan_compiles_each_split_for_a_simulated_slice(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "plan.json"
    c = tiny_config()
    c.model.num_classes = 10
    results = aot.plan(c, "v5e-4", simulate=True, remats=("none",), log=lambda s: None)
    assert [(m.layout.data, m.layout.fsdp) for m in results] and all(m.fits for m in results)
    assert {(m.layout.data, m.layout.fsdp) for m in results} == {(4, 1), (1, 4)}
    assert all(m.bound_s > 0 and m.binding in ("compute", "memory", "communication") for m in results)
    assert results[0].bound_s <= results[1].bound_s
    code = aot.main(["--config", "tests/tiny_digits.py", "--topology", "v5e-4", "--simulate", "--plan",
                     "--num-classes", "10", "--plan-remat", "none", "--plan-json", str(path)])
    out = capsys.readouterr().out
    assert code == 0 and "| rank | layout |" in out and "best: " in out
    rows = json.loads(path.read_text())["plan"]
    assert len(rows) == 2 and rows[0]["fits"] and rows[0]["bound_s"] <= rows[1]["bound_s"]


def _fits_from(chips_needed, hbm=16 * 2**30, activations=0.0):
    """A fake compile: the layout fits from `chips_needed` chips; `activations` of the bytes shrink with
    microbatches."""
    compiled = []

    def compile_at(chips, layout):
        compiled.append((chips, layout.microbatches))
        gib = 16 * chips_needed / chips * (1 - activations + activations / layout.microbatches)
        return P.Measured(layout, total_bytes=gib * 2**30 * 0.99, hbm_bytes=hbm, bound_s=1.0 / chips,
                          binding="compute")
    return compile_at, compiled


def test_smallest_walks_down_from_a_good_start_in_two_compiles():
    compile_at, compiled = _fits_from(8)
    best, results = P.smallest(compile_at, [4, 8, 16, 32, 64], global_batch=4096, start=8, microbatches=())
    assert best.layout == P.Layout(1, 8, remat="full") and compiled == [(8, 1), (4, 1)]
    assert [m.fits for m in results] == [True, False]


def test_smallest_walks_up_from_a_start_too_small_and_from_the_middle_without_one():
    compile_at, compiled = _fits_from(32)
    best, _ = P.smallest(compile_at, [4, 8, 16, 32, 64], global_batch=4096, start=4, microbatches=())
    assert best.layout.fsdp == 32 and [c for c, _ in compiled] == [4, 8, 16, 32]
    compile_at, compiled = _fits_from(4)
    best, _ = P.smallest(compile_at, [4, 8, 16, 32, 64], global_batch=4096, microbatches=())
    assert best.layout.fsdp == 4 and [c for c, _ in compiled] == [16, 8, 4]
    compile_at, compiled = _fits_from(128)
    best, _ = P.smallest(compile_at, [4, 8, 16, 32, 64], global_batch=4096, start=64, microbatches=())
    assert best is None and compiled == [(64, 1)]


def test_smallest_adds_microbatches_and_skips_sizes_the_batch_does_not_divide():
    # 2x over HBM on 4 chips, 90 % of it activations: 4 microbatches bring it to 2 * (0.1 + 0.9 / 4) = 0.65.
    compile_at, compiled = _fits_from(8, activations=0.9)
    best, _ = P.smallest(compile_at, [4, 8, 16], global_batch=96, start=4)
    assert compiled[:3] == [(4, 1), (4, 2), (4, 4)] and best.layout == P.Layout(1, 4, remat="full", microbatches=4)
    compile_at, compiled = _fits_from(4)
    best, _ = P.smallest(compile_at, [3, 4, 5], global_batch=12, start=5, microbatches=())
    assert compiled == [(4, 1), (3, 1)] and best.layout.fsdp == 4  # 5 does not divide 12: the walk starts at 4


def test_predicted_start_scales_a_measured_slice_as_one_over_chips():
    assert P.predicted_start(30 * 2**30, 64, 95 * 2**30, [4, 8, 16, 32, 64]) == 32  # 30 GiB x 64 / 32 = 60 <= 85.5
    assert P.predicted_start(1 * 2**30, 64, 95 * 2**30, [4, 8, 16, 32, 64]) == 4
    assert P.predicted_start(200 * 2**30, 64, 95 * 2**30, [4, 8, 16, 32, 64]) == 64


def test_smaller_slices_of_each_generation():
    from crate_jax.parallel.tpu_slices import parse, smaller_slices
    assert [s.accelerator_type for s in smaller_slices(parse("v5p-128"))] == [
        "v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128"]
    assert [s.chips for s in smaller_slices(parse("v6e-16"))] == [1, 4, 8, 16]


@pytest.mark.slow
def test_smallest_compiles_for_a_simulated_generation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    path = tmp_path / "smallest.json"
    code = aot.main(["--config", "tests/tiny_digits.py", "--topology", "v5e-8", "--simulate", "--smallest",
                     "--num-classes", "10", "--smallest-start", "v5e-4", "--plan-json", str(path)])
    out = capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert code == 0 and "smallest: v5litepod-1 (1 chips)" in out, out
    assert doc["smallest"] == "v5litepod-1" and [r["chips"] for r in doc["tried"]] == [4, 1]
    assert all(r["fits"] and r["remat"] == "full" and r["fsdp"] == r["chips"] for r in doc["tried"])


def test_plan_stops_on_a_config_error_that_is_not_the_layout_s():
    from crate_jax.errors import ConfigError
    c = tiny_config()
    c.model.num_classes = 10
    c.res = 30  # not a multiple of the patch size: every layout fails the same way, and the plan says so once
    lines = []
    with pytest.raises(ConfigError, match="30"):
        aot.plan(c, "v5e-4", simulate=True, remats=("none",), log=lines.append)
    assert lines[1:] and all(s.startswith("data 4,") for s in lines[1:])  # the second split's error is raised


def test_smallest_stops_on_a_config_error():
    from crate_jax.errors import ConfigError
    c = tiny_config()
    c.model.num_classes = 10
    c.res = 30
    with pytest.raises(ConfigError, match="30"):
        aot.smallest_slice(c, "v5e-8", simulate=True, log=lambda s: None)
