"""Where a step's bytes, FLOPs and collectives go (`crate_jax.parallel.hlo_cost`): the parser on hand-written HLO
with known answers, and on a real compiled two-tower step for 8 simulated CPU devices, where the parts add up to
the totals and the FSDP program moves no more than 1.5x the bytes of the data-parallel one (XLA's CPU cost
analysis; the TPU figures are in bench/RESULTS.md)."""

import math

import pytest

from crate_jax.parallel import hlo_cost as H

HLO = """HloModule jit_step, is_scheduled=true

FileNames
1 "/x/crate_jax/models/layers.py"
2 "/x/crate_jax/train/step.py"

FunctionNames
1 "Dense.__call__"
2 "make_train_step.<locals>.step"

FileLocations
1 {file_name_id=1 function_name_id=1 line=116 end_line=116 column=1 end_column=1}
2 {file_name_id=2 function_name_id=2 line=37 end_line=37 column=1 end_column=1}

StackFrames
1 {file_location_id=2 parent_frame_id=0}
2 {file_location_id=1 parent_frame_id=2}

%fused_dot (param_0: bf16[64,128], param_1: bf16[128,256]) -> f32[64,256] {
  %param_0 = bf16[64,128]{1,0} parameter(0)
  %param_1 = bf16[128,256]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,256]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[64,256])) -> (s32[], f32[64,256]) {
  %p = (s32[], f32[64,256]) parameter(0)
  %gte = f32[64,256]{1,0} get-tuple-element(%p), index=1
  ROOT %add.9 = f32[64,256]{1,0} add(%gte, %gte)
}

%cond (p: (s32[], f32[64,256])) -> pred[] {
  %p = (s32[], f32[64,256]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (Arg_0: bf16[64,128], Arg_1: bf16[16,256]) -> f32[64,256] {
  %Arg_0 = bf16[64,128]{1,0} parameter(0)
  %Arg_1 = bf16[16,256]{1,0} parameter(1)
  %all-gather.1 = bf16[128,256]{1,0} all-gather(%Arg_1), channel_id=1, replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0'}, dimensions={0}, metadata={op_name="jit(step)/jvp()/dot_general" stack_frame_id=2}
  %fusion.1 = f32[64,256]{1,0} fusion(%Arg_0, %all-gather.1), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/transpose(jvp())/dot_general" stack_frame_id=2}
  %tuple = (s32[], f32[64,256]) tuple(%c0, %fusion.1)
  %while.1 = (s32[], f32[64,256]) while(%tuple), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %all-reduce.1 = f32[64,256]{1,0} all-reduce(%fusion.1), channel_id=2, replica_groups=[2,8]<=[16], to_apply=%add
}
"""


def test_hand_written_module_has_the_known_costs():
    b = H.Breakdown.of(HLO)
    by_name = {c.name: c for c in b.charges}
    f32, bf16 = 4, 2
    gather = by_name["all-gather.1"]
    assert gather.bytes == 16 * 256 * bf16 + 128 * 256 * bf16 and gather.collective == "all-gather"
    assert gather.group == 8 and gather.wire_bytes() == pytest.approx(7 / 8 * 128 * 256 * bf16)
    fusion = by_name["fusion.1"]
    assert fusion.bytes == 64 * 128 * bf16 + 128 * 256 * bf16 + 64 * 256 * f32
    assert fusion.flops == 2 * 64 * 256 * 128
    assert fusion.source == "models/layers.py:116 Dense.__call__ < train/step.py:37 make_train_step (bwd)"
    add = by_name["add.9"]  # in the loop body: charged three times
    assert add.bytes == 3 * (3 * 64 * 256 * f32) and add.count == 3  # two operands + the result
    reduce = by_name["all-reduce.1"]
    assert reduce.group == 8 and reduce.wire_bytes() == pytest.approx(2 * 7 / 8 * 64 * 256 * f32)
    assert set(by_name) == {"all-gather.1", "fusion.1", "add.9", "all-reduce.1"}  # tuple plumbing is free
    assert b.bytes == sum(c.bytes for c in b.charges)
    assert sum(v for _, v, _ in b.by(lambda c: c.opcode)) == pytest.approx(b.bytes)
    roof = H.Roofline(b.flops, b.bytes, b.wire_bytes, "v5p")
    assert roof.binding in ("compute", "memory", "communication") and roof.bound_s == max(roof.times.values())
    assert "communication" in roof.text()


def test_v6e_forms_async_slices_and_mesh_groups_with_a_device_order():
    """The v6e compiler writes replica groups as mesh axes with a device order between them and the axes, and
    moves parts of a buffer with async `slice-start`s, each moving only its slice (not the whole operand)."""
    text = HLO.replace("replica_groups=mesh['axis_0'=8,'axis_1'=2] {'axis_0'}",
                       "replica_groups=mesh['axis_0'=8,'axis_1'=2], device_ids=([2,8]T(1,0)) {'axis_0'}")
    text = text.replace("  ROOT %all-reduce.1", "  %slice-start.1 = ((s8[4096]{0}), s8[1024]{0:S(1)}, s32[]{:S(2)}) "
                        "slice-start(%Arg_2), slice={[0:1024]}\n"
                        "  %slice-done.1 = s8[1024]{0:S(1)} slice-done(%slice-start.1)\n  ROOT %all-reduce.1")
    text = text.replace("-> f32[64,256] {\n  %Arg_0", "-> f32[64,256] {\n  %Arg_2 = s8[4096]{0} parameter(2)\n  %Arg_0")
    by_name = {c.name: c for c in H.Breakdown.of(text).charges}
    assert by_name["all-gather.1"].group == 8
    assert by_name["slice-start.1"].bytes == 2 * 1024 and "slice-done.1" not in by_name  # read + write the slice


SCANNED = """HloModule jit_step, is_scheduled=true

%slice_and_scale (p0: f32[12,64,256], p1: s32[]) -> f32[64,256] {
  %p0 = f32[12,64,256]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,64,256]{2,1,0} dynamic-slice(%p0, %p1, %z, %z), dynamic_slice_sizes={1,64,256}
  ROOT %r = f32[64,256]{1,0} reshape(%ds)
}

%outer (q0: f32[12,64,256], q1: s32[], q2: f32[64,256]) -> f32[64,256] {
  %q0 = f32[12,64,256]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %q2 = f32[64,256]{1,0} parameter(2)
  %inner = f32[64,256]{1,0} fusion(%q0, %q1), kind=kLoop, calls=%slice_and_scale
  ROOT %m = f32[64,256]{1,0} multiply(%inner, %q2)
}

%whole (w0: f32[12,64,256]) -> f32[12,64,256] {
  %w0 = f32[12,64,256]{2,1,0} parameter(0)
  ROOT %n = f32[12,64,256]{2,1,0} negate(%w0)
}

ENTRY %main (stack: f32[12,64,256], i: s32[], x: f32[64,256]) -> f32[64,256] {
  %stack = f32[12,64,256]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %x = f32[64,256]{1,0} parameter(2)
  %fusion.1 = f32[64,256]{1,0} fusion(%stack, %i, %x), kind=kLoop, calls=%outer
  %fusion.2 = f32[12,64,256]{2,1,0} fusion(%stack), kind=kLoop, calls=%whole
  ROOT %t = (f32[64,256], f32[12,64,256]) tuple(%fusion.1, %fusion.2)
}
"""


def test_a_layer_s_slice_of_a_stacked_array_read_inside_a_nested_fusion_counts_the_slice():
    """A scanned layer reads its slice of the stacked `[depth, ...]` arrays through a dynamic-slice that XLA
    often puts in a fusion nested inside the consumer: the slice is what is read, not all 12 layers."""
    by_name = {c.name: c for c in H.Breakdown.of(SCANNED).charges}
    layer = 64 * 256 * 4
    assert by_name["fusion.1"].in_bytes == layer + 4 + layer  # one layer's slice, the index, x
    assert by_name["fusion.2"].in_bytes == 12 * layer  # an elementwise op on the whole stack reads all of it


def test_tpu_batched_matmul_written_as_convolution_counts_its_flops():
    conv = H.Instr("c", "convolution", "f32[512,16,37,37]{2,3,1,0}",
                   "bf16[512,37,16,64]{3,1,2,0}, bf16[512,37,16,64]{3,1,2,0}",
                   ", window={size=512x16 stride=511x15 lhs_dilate=512x16}, dim_labels=0b1f_0o1i->01bf", "x")
    # attention scores of 512 sequences x 16 heads: 37 x 37 outputs, each a 64-long dot product
    assert H.dot_flops(conv) == 2 * 512 * 16 * 37 * 37 * 64


def test_pallas_kernels_count_their_estimate_or_their_matmuls():
    """A TPU kernel's custom call is opaque to XLA: its FLOPs come from the cost estimate the kernel wrote into
    its backend config, or, for the flash-attention backward kernels (which write none), from their matmuls."""
    q = "bf16[4,12,256,64]{3,2,1,0}"
    fwd = H.Instr("flash_attention.1", "custom-call", f"({q}, f32[4,12,256,128])", f"{q}, {q}, {q}",
                  ', custom_call_target="tpu_custom_call", backend_config={"cost_estimate":{"flops":"814743552",'
                  '"transcendentals":"3145728","bytes_accessed":"18874368"}}', "x")
    dkv = H.Instr("flash_mha_bwd_dkv_block_q_major_128_block_q_128.3", "custom-call", f"({q}, {q})",
                  f"{q}, {q}, {q}", ', custom_call_target="tpu_custom_call", backend_config={}', "x")
    dq = H.Instr("flash_mha_bwd_dq_block_q_major_128.1", "custom-call", q, dkv.operands, dkv.attrs, "x")
    other = H.Instr("my_kernel.1", "custom-call", q, dkv.operands, dkv.attrs, "x")
    pairs = 4 * 12 * 256 * 256 * 64  # (query, key) pairs x head dimension
    assert H.custom_call_flops(fwd, fwd.operands) == 814743552
    assert H.custom_call_flops(dkv, dkv.operands) == 2 * 4 * pairs
    assert H.custom_call_flops(dq, dq.operands) == 2 * 3 * pairs
    assert H.custom_call_flops(other, other.operands) == 0.0


def test_flash_kernels_read_the_blocks_they_stream_again():
    """T = 1,024 in 256-token blocks: the forward and dQ kernels read K and V four times, the dK/dV kernel its
    query-side operands (q, two float32 row statistics) four times; another kernel reads its operands once."""
    q, stat = "bf16[2,4,1024,64]", "f32[2,4,1024,128]"
    nq, ns = 2 * 4 * 1024 * 64 * 2, 2 * 4 * 1024 * 128 * 4
    assert H.kernel_cost.flash_forward_block(["fusion.1", "flash_mha_bwd_dq_block_q_major_256_block_k_major_256.2"]) == 256
    assert H.kernel_cost.flash_forward_block(["flash_attention.1"]) == 128
    assert H.kernel_reads("flash_attention.3", [q, q, q], 256) == 3 * nq + 3 * 2 * nq
    assert H.kernel_reads("flash_mha_bwd_dq_block_q_major_256_block_k_major_256", [q, q, q, stat, stat]) == (
        3 * nq + 2 * ns + 3 * 2 * nq)
    assert H.kernel_reads("flash_mha_bwd_dkv_block_q_major_256_block_q_256_block_k_major_256", [q, q, q, stat, stat]) \
        == 3 * nq + 2 * ns + 3 * (nq + 2 * ns)
    assert H.kernel_reads("my_kernel.1", [q, q, q], 256) == 3 * nq


@pytest.mark.slow
def test_fsdp_two_tower_moves_no_more_than_data_parallel(tmp_path):
    """A tiny CLIPA two-tower step compiled for 8 simulated devices, data-parallel and 8-way FSDP: the breakdown's
    parts sum to its total, which tracks XLA's own byte count, and FSDP stays within 1.5x the bytes of data
    parallelism (activations held batch-sharded between blocks, weights all-gathered: models/act_sharding.py)."""
    from crate_jax.parallel.mesh import make_mesh
    from crate_jax.train.setup import Setup
    from test_clip import make_synth, tiny_config
    data = make_synth(tmp_path)
    totals = {}
    for name, mesh in (("data", {"data": 8, "fsdp": 1, "tensor": 1}), ("fsdp", {"data": 1, "fsdp": 8, "tensor": 1})):
        c = tiny_config(data, mesh=mesh, batch=32)
        c.evals = {}
        compiled = Setup(c, make_mesh(c.mesh)).compile()
        b = H.Breakdown.of(compiled)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        kinds = b.by(lambda ch: ch.collective or ch.opcode)
        assert math.isclose(sum(v for _, v, _ in kinds), b.bytes, rel_tol=1e-9)
        assert 0.6 < b.bytes / float(cost["bytes accessed"]) < 1.6, (b.bytes, cost["bytes accessed"])
        assert b.flops > 0 and "collectives:" in b.text()
        totals[name] = float(cost["bytes accessed"])
    assert any(c.collective == "all-gather" for c in b.charges)  # FSDP gathers its weights
    assert totals["fsdp"] <= 1.5 * totals["data"], totals
