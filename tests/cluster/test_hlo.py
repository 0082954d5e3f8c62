"""The HLO collective parser: every replica-group syntax, and the flat / two_hop dispatch
programs on an in-process (2, 4) mesh with hand-computed group sizes and payload bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.cluster import hlo
from dsv3_jax.model.experts import bind_experts
from dsv3_jax.parallel import dispatch
from dsv3_jax.parallel.mesh import make_mesh

AXES = ("node", "gpu")
NODES, GPUS, T_LOCAL, K, D, F = 2, 4, 6, 3, 16, 8


# ---------------------------------------------------------------- syntaxes (hand-written text)

HLO_TEXT = """HloModule jit_f, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (p: f32[8,16], q: bf16[4]) -> f32[8,16] {
  %p = f32[8,16]{1,0} parameter(0)
  %q = bf16[4]{0} parameter(1)
  %ar = f32[8,16]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %ag = f32[16,16]{1,0} all-gather(%p), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, use_global_device_ids=true
  %rs = f32[4,16]{1,0} reduce-scatter(%p), channel_id=3, replica_groups=mesh['a'=2,'b'=4] {'a'}, dimensions={0}, to_apply=%add
  %all = f32[8,16]{1,0} all-reduce(%p), channel_id=4, replica_groups={}, to_apply=%add
  %a2a = (f32[2,16]{1,0}, f32[2,16]{1,0}, f32[2,16]{1,0}, f32[2,16]{1,0}, /*index=4*/f32[0,16]{1,0}) all-to-all(%p, %p, %p, /*index=3*/%p, %p), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}
  %ars = bf16[4]{0} all-reduce-start(%q), channel_id=6, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  %ard = bf16[4]{0} all-reduce-done(%ars)
  %cp = f32[8,16]{1,0} collective-permute(%p), channel_id=7, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %sub = f32[8,16]{1,0} all-reduce(%p), channel_id=8, replica_groups=mesh['x'=2,'y'=4] {'y':(1)2}, to_apply=%add
  %ids = f32[16]{0} all-gather(%p), channel_id=9, replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
  ROOT %out = f32[8,16]{1,0} add(%ar, %all)
}
"""


def test_hlo_replica_group_syntaxes():
  colls = {c.name: c for c in hlo.parse_hlo(HLO_TEXT)}
  assert set(colls) == {"ar", "ag", "rs", "all", "a2a", "ars", "cp", "sub", "ids"}  # no -done
  assert colls["ar"].groups == ((0, 1, 2, 3), (4, 5, 6, 7))  # iota [2,4]<=[8]
  assert colls["ag"].groups == ((0, 4), (1, 5), (2, 6), (3, 7))  # transposed iota
  assert colls["rs"].groups == ((0, 4), (1, 5), (2, 6), (3, 7))  # mesh form, axis 'a'
  assert colls["all"].groups == (tuple(range(8)),)  # {} = every device (num_partitions)
  assert colls["a2a"].group_size == 4 and colls["a2a"].num_groups == 2
  assert colls["ars"].kind == "all-reduce" and colls["ars"].opcode == "all-reduce-start"
  assert colls["cp"].groups == ((0, 1), (2, 3))  # connected sets of the pairs
  # Sub-axis 'y':(1)2 of y=4: the first half of y varies, its second half is fixed.
  assert colls["sub"].groups == ((0, 2), (1, 3), (4, 6), (5, 7))
  # As GSPMD emits it (jax 0.10.2): the mesh's devices are iota [2,4] transposed, i.e.
  # (0,4,1,5,2,6,3,7) as a [4, 2] mesh; groups vary axis_0.
  assert colls["ids"].groups == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_hlo_bytes_per_device():
  colls = {c.name: c for c in hlo.parse_hlo(HLO_TEXT)}
  b = 8 * 16 * 4  # f32[8,16]
  assert colls["ar"].operand_bytes == b and colls["ar"].wire_bytes == 2 * b * 3 / 4
  assert colls["ag"].result_bytes == 2 * b and colls["ag"].wire_bytes == b * 1
  assert colls["rs"].result_bytes == 4 * 16 * 4 and colls["rs"].wire_bytes == b / 2
  assert colls["a2a"].operand_bytes == 5 * b  # operand types resolved from %p
  assert colls["ars"].operand_bytes == 4 * 2  # bf16[4]
  assert colls["ars"].result_bytes == 8 and colls["ars"].wire_bytes == 2 * 8 * 1 / 2
  assert colls["cp"].wire_bytes == b


def test_stablehlo_dense_forms():
  # replica_groups as a nested list, as hex (what MLIR prints for large groups), as a splat.
  hexgroups = np.array([[0, 2], [1, 3]], "<i8").tobytes().hex().upper()
  text = f"""module @jit_f attributes {{mhlo.num_partitions = 4 : i32, mhlo.num_replicas = 1 : i32}} {{
    %1 = "stablehlo.all_to_all"(%0) <{{channel_handle = #stablehlo.channel_handle<handle = 1, type = 1>, concat_dimension = 0 : i64, replica_groups = dense<[[0, 1], [2, 3]]> : tensor<2x2xi64>, split_count = 2 : i64, split_dimension = 0 : i64}}> : (tensor<8x16xbf16>) -> tensor<8x16xbf16>
    %2 = "stablehlo.all_reduce"(%1) <{{channel_handle = #stablehlo.channel_handle<handle = 2, type = 1>, replica_groups = dense<"0x{hexgroups}"> : tensor<2x2xi64>, use_global_device_ids}}> ({{
    ^bb0(%a: tensor<f32>, %b: tensor<f32>):
      %s = stablehlo.add %a, %b : tensor<f32>
      stablehlo.return %s : tensor<f32>
    }}) : (tensor<4xf32>) -> tensor<4xf32>
    %3 = "stablehlo.collective_permute"(%2) <{{channel_handle = #stablehlo.channel_handle<handle = 3, type = 1>, source_target_pairs = dense<[[0, 1], [1, 0]]> : tensor<2x2xi64>}}> : (tensor<4xf32>) -> tensor<4xf32>
    %4 = "stablehlo.all_gather"(%2) <{{all_gather_dim = 0 : i64, channel_handle = #stablehlo.channel_handle<handle = 4, type = 1>, replica_groups = dense<0> : tensor<1x1xi64>}}> : (tensor<4xf32>) -> tensor<4xf32>
  }}"""
  a2a, ar, cp, ag = hlo.parse_stablehlo(text)
  assert (a2a.kind, a2a.groups, a2a.dtypes) == ("all-to-all", ((0, 1), (2, 3)), ("bf16",))
  assert a2a.operand_bytes == 8 * 16 * 2 and a2a.wire_bytes == 8 * 16 * 2 / 2
  assert (ar.kind, ar.groups, ar.operand_bytes) == ("all-reduce", ((0, 2), (1, 3)), 16)
  assert cp.kind == "collective-permute" and cp.groups == ((0, 1),)
  assert ag.group_size == 1 and ag.wire_bytes == 0


def test_bad_replica_groups_raise():
  with pytest.raises(ValueError, match="replica groups"):
    hlo.parse_hlo(HLO_TEXT.replace("[2,4]<=[8]", "[2,4]<=[7]"))
  with pytest.raises(ValueError, match="axis 'z'"):
    hlo.parse_hlo(HLO_TEXT.replace("{'a'}", "{'z'}"))


# ---------------------------------------------------------------- dispatch programs


def _program(schedule, capacity, dtype):
  n_dev = NODES * GPUS
  e = n_dev  # one expert per device
  mesh = make_mesh(NODES, GPUS)
  topo = dispatch.EPTopology(NODES, GPUS)
  sched = dispatch.get_schedule(schedule)
  tok = P(AXES)

  def run(x, idx, w, valid, wg, wu, wd):
    return sched(x, idx, w, valid, bind_experts(wg, wu, wd), capacity=capacity, topo=topo,
                 n_experts=e)

  stats_spec = dispatch.DispatchStats(*([P()] * len(dispatch.DispatchStats._fields)))
  fn = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(tok,) * 7, out_specs=(tok, stats_spec)))
  t = n_dev * T_LOCAL
  sds = jax.ShapeDtypeStruct
  args = (sds((t, D), dtype), sds((t, K), jnp.int32), sds((t, K), jnp.float32),
          sds((t,), jnp.bool_), sds((e, D, F), jnp.float32), sds((e, D, F), jnp.float32),
          sds((e, F, D), jnp.float32))
  return hlo.analyze(fn.lower(*args))


def _a2a(colls):
  return [c for c in colls if c.kind == "all-to-all"]


def test_flat_dispatch_collectives():
  c = 5
  res = _program("flat", (c,), jnp.bfloat16)
  # Lowered: dispatch and combine payloads [n_dev, C, D] in bf16, plus the int32 expert ids,
  # all over one group of all 8 devices.
  a2a = _a2a(res["stablehlo"])
  assert {(x.group_size, x.num_groups) for x in a2a} == {(8, 1)}
  payload = [x for x in a2a if x.dtypes == ("bf16",)]
  assert len(payload) == 2
  for x in payload:
    assert x.operands[0].shape == (8, c, D)
    assert x.operand_bytes == 8 * c * D * 2  # capacity x D x itemsize per destination
    assert x.wire_bytes == 7 * c * D * 2  # 7 of the 8 destinations are other devices
  assert [x.operand_bytes for x in a2a if x.dtypes == ("s32",)] == [8 * c * 4]
  # Compiled: the same groups and element counts (XLA:CPU may split into one operand per peer
  # and widen bf16 to f32, so compare elements rather than bytes).
  compiled = _a2a(res["hlo"])
  assert {(x.group_size, x.num_groups) for x in compiled} == {(8, 1)}
  elems = sorted(sum(int(np.prod(o.shape)) for o in x.operands) for x in compiled)
  assert elems == sorted([8 * c] + [8 * c * D] * 2)
  # Statistics are reduced per axis: groups of 4 (gpu) and 2 (node), never 8.
  reduce_groups = {x.group_size for x in res["hlo"] if x.kind == "all-reduce"}
  assert reduce_groups <= {4, 2}
  assert hlo.group_sizes(res["hlo"]) == (8, 4, 2)


def test_two_hop_dispatch_collectives():
  c1, c2 = 3, 7
  res = _program("two_hop", (c1, c2), jnp.float32)
  a2a = _a2a(res["stablehlo"])
  node = [x for x in a2a if x.group_size == NODES]
  gpu = [x for x in a2a if x.group_size == GPUS]
  assert len(node) + len(gpu) == len(a2a)  # no all-to-all over all 8 devices
  assert all(x.num_groups == GPUS for x in node) and all(x.num_groups == NODES for x in gpu)
  # Hop 1 (node axis): rows [n_nodes, C1, D] out and back, gate weights and expert ids
  # [n_nodes, C1, k].
  assert sorted((str(x.operands[0]), x.operand_bytes) for x in node) == sorted([
      (f"f32[{NODES},{c1},{D}]", NODES * c1 * D * 4)] * 2 + [
      (f"f32[{NODES},{c1},{K}]", NODES * c1 * K * 4),
      (f"s32[{NODES},{c1},{K}]", NODES * c1 * K * 4)])
  # Hop 2 (gpu axis): rows [gpus, C2, D] out and back, local expert ids [gpus, C2].
  assert sorted((str(x.operands[0]), x.operand_bytes) for x in gpu) == sorted([
      (f"f32[{GPUS},{c2},{D}]", GPUS * c2 * D * 4)] * 2 + [
      (f"s32[{GPUS},{c2}]", GPUS * c2 * 4)])
  for x in node:
    assert x.wire_bytes == x.operand_bytes * (NODES - 1) / NODES
  assert max(x.group_size for x in res["hlo"]) == GPUS
  assert hlo.group_sizes(res["hlo"]) == (4, 2)
  table = hlo.collective_table(res["hlo"] + res["stablehlo"], title="two_hop")
  assert table.startswith("two_hop") and "| stablehlo | all-to-all | 2 | 4 |" in table
  assert sum(r["count"] for r in hlo.summarize(res["stablehlo"])) == len(res["stablehlo"])


def test_gspmd_program_mesh_form():
  # A jit with shardings (partitioned by XLA, not shard_map): jax 0.10.2 prints mesh-form
  # replica groups; summing over the 'node' axis of a (2, 4) mesh reduces pairs (g, 4 + g).
  from jax.sharding import NamedSharding

  mesh = make_mesh(NODES, GPUS)
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("node", "gpu")))
  f = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
  colls = hlo.parse_hlo(f.lower(x).compile().as_text())
  reduce = [c for c in colls if c.kind == "all-reduce"]
  assert reduce and reduce[0].groups == ((0, 4), (1, 5), (2, 6), (3, 7))
  assert reduce[0].operand_bytes == 4 * 4  # f32[4]: this device's 4 columns
