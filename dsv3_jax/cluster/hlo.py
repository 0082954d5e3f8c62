"""Collectives of a compiled program, read from its HLO text: kind, replica groups, bytes.

A jitted program can be analysed at any device count without running it (one CPU process
compiles a 2048-device shard_map program: the MoE step of results/scale_2048.md in ~30 s):

    lowered = jax.jit(f).lower(*args)
    hlo = parse_hlo(lowered.compile().as_text())        # compiled (optimised) HLO
    shlo = parse_stablehlo(lowered.as_text())           # lowered StableHLO (before XLA)
    print(collective_table(hlo))

Two sources, because they differ:

* The compiled HLO is what runs: XLA may split an all-to-all into one operand per peer (the
  tuple form), combine or CSE collectives, and on XLA:CPU it *widens* bfloat16 / float8
  collectives to float32 / float16 (a `convert` around the collective). Bytes from it are what
  the CPU emulation moves, not what an accelerator would.
* The lowered StableHLO is what the program asked for, in the dtypes it asked for: use it for the
  bytes a real accelerator would put on the wire.

Every `Collective` says which source it came from (`source`). Counts are static occurrences in
the program text: a collective inside a `while` body executes once per iteration.

Replica-group syntaxes understood (HLO): explicit `{{0,1},{2,3}}`, empty `{}` (all devices),
iota `[G,S]<=[d0,d1,...]` with an optional transpose `T(p0,p1,...)`, and the mesh-axes form
`mesh['a'=4,'b'=8] {'a'}` (sub-axes `'a':(pre)size`, and a `device_ids=([2,4]T(1,0))` or
`device_ids=(i0,i1,...)` clause, too); StableHLO: `dense<[[...]]>`, the hexadecimal
`dense<"0x...">` that MLIR prints for large groups, and splats. What jax 0.10.2 on XLA:CPU
emits (checked): shard_map programs on (2, 4) and (256, 8) meshes, the explicit form in compiled
HLO and `dense<...>` in StableHLO; GSPMD-partitioned programs (jit with shardings), the mesh
form (with and without `device_ids`) and the iota form.

Byte conventions, per device and per collective call (S = group size, B = the bytes one device
passes in, summed over operands):

* all-to-all: `operand_bytes` = B; a device keeps 1/S of it: `wire_bytes` = B (S - 1) / S.
* all-gather: B is one shard; result S B; `wire_bytes` = B (S - 1) (each shard reaches S - 1 peers
  in any algorithm; ring: each device sends S - 1 shards).
* reduce-scatter: B is the full buffer; result B / S; `wire_bytes` = B (S - 1) / S (ring).
* all-reduce: `wire_bytes` = 2 B (S - 1) / S (ring: reduce-scatter + all-gather).
* collective-permute / collective-broadcast: `wire_bytes` = B (a device that is a source sends
  its buffer once).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np

# Types and replica-group decoders live in hlo_types.py (re-exported: hlo.Collective etc.).
from dsv3_jax.cluster.hlo_types import (  # noqa: F401
    ArrayType, Collective, KINDS, _HLO_ARRAY, _HLO_DTYPE_BYTES, _HLO_OPCODES, _MLIR_DTYPES,
    _MLIR_OPCODES, _attr_value, _balanced, _explicit_groups, _groups_from_hlo_attr,
    _groups_tuple, _hlo_types, _iota_groups, _mesh_groups, _permute_components)

# ------------------------------------------------------------------------------ HLO


_HLO_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?.*\{\s*$")


def _split_instruction(rest: str):
  """'TYPE opcode(operands), attrs' -> (type text, opcode, operand text, attribute text)."""
  rest = rest.strip()
  if rest.startswith("("):
    end = _balanced(rest, 0, "(", ")")
  else:
    m = re.match(r"\S+", rest)
    end = m.end()
    # A layout may contain spaces only inside braces, which \S+ keeps together in practice.
  type_text = rest[:end]
  m = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest[end:])
  if not m:
    return type_text, "", "", ""
  op_start = end + m.end() - 1
  op_end = _balanced(rest, op_start, "(", ")")
  return type_text, m.group(1), rest[op_start + 1:op_end - 1], rest[op_end:]


def _split_operands(text: str) -> list[str]:
  """Operand list at the top nesting level."""
  out, depth, cur = [], 0, []
  text = re.sub(r"/\*.*?\*/", "", text)
  for c in text:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      out.append("".join(cur).strip())
      cur = []
    else:
      cur.append(c)
  if "".join(cur).strip():
    out.append("".join(cur).strip())
  return out


def parse_hlo(text: str, n_devices: Optional[int] = None) -> list[Collective]:
  """Collectives of a compiled HLO module, in program order.

  Args:
    text: HLO text, e.g. `jax.jit(f).lower(*args).compile().as_text()` (or an unoptimised HLO
      module's text).
    n_devices: total devices, used only for a collective without replica groups (all devices);
      default: num_partitions x replica_count from the module header.

  Returns:
    One `Collective` per collective instruction (`-done` halves of async pairs are skipped);
    `source` = "hlo". Operand types come from the defining instructions of the operands (the
    compiled text does not repeat them inline).

  Raises:
    ValueError: unparseable replica groups or an unknown element type.
  """
  header = re.search(r"^HloModule[^\n]*", text, flags=re.M)
  if n_devices is None:
    n_devices = 0
    if header:
      parts = re.search(r"num_partitions=(\d+)", header.group(0))
      reps = re.search(r"replica_count=(\d+)", header.group(0))
      n_devices = (int(parts.group(1)) if parts else 1) * (int(reps.group(1)) if reps else 1)
  types: dict[str, tuple[ArrayType, ...]] = {}
  pending = []
  computation = ""
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("HloModule"):
      continue
    m = _HLO_INSTR.match(line)
    if not m:
      c = _COMPUTATION.match(line)
      if c:
        computation = c.group(1)
      continue
    name, rest = m.group(1), m.group(2)
    type_text, opcode, operand_text, attrs = _split_instruction(rest)
    types[name] = _hlo_types(type_text)
    if opcode in _HLO_OPCODES:
      pending.append((name, opcode, type_text, operand_text, attrs, computation))
  out = []
  for name, opcode, type_text, operand_text, attrs, comp in pending:
    kind = _HLO_OPCODES[opcode]
    operands = []
    for op in _split_operands(operand_text):
      inline = _hlo_types(op.rsplit(" ", 1)[0]) if " " in op else ()
      if inline:
        operands.extend(inline)
      else:
        operands.extend(types.get(op.split()[-1].lstrip("%"), ()))
    if kind in ("collective-permute", "collective-broadcast") and "source_target_pairs=" in attrs:
      pairs = _explicit_groups(_attr_value(attrs, "source_target_pairs"))
      comps = _permute_components(pairs)
      groups = _groups_tuple(comps)
      size = max((len(c) for c in comps), default=1)
    else:
      arr = _groups_from_hlo_attr(_attr_value(attrs, "replica_groups"), n_devices)
      groups, size = _groups_tuple(arr), int(arr.shape[1])
    out.append(Collective(kind=kind, name=name, source="hlo", group_size=size,
                          num_groups=len(groups), groups=groups, operands=tuple(operands),
                          results=_hlo_types(type_text), computation=comp, opcode=opcode))
  return out


# ------------------------------------------------------------------------- StableHLO


_MLIR_TENSOR = re.compile(r"tensor<([^<>]*)>")


def _mlir_type(body: str) -> ArrayType:
  """'8x16xf32' -> ArrayType('f32', (8, 16)); 'f32' -> scalar."""
  parts = body.split(",")[0].strip().split("x")
  dtype = parts[-1]
  dims = tuple(int(p) for p in parts[:-1])
  if dtype in _MLIR_DTYPES:
    name = _MLIR_DTYPES[dtype]
  else:
    name = dtype.lower()  # f8E4M3FN -> f8e4m3fn
  return ArrayType(name, dims)


def _mlir_types(text: str) -> tuple[ArrayType, ...]:
  return tuple(_mlir_type(m.group(1)) for m in _MLIR_TENSOR.finditer(text))


def _dense_groups(attrs: str, key: str) -> Optional[np.ndarray]:
  """The int64 matrix of `key = dense<...> : tensor<AxBxi64>` in an MLIR attribute dict."""
  m = re.search(rf"\b{key}\s*=\s*dense<", attrs)
  if not m:
    return None
  start = m.end() - 1
  end = _balanced(attrs, start, "<", ">")
  value = attrs[start + 1:end - 1].strip()
  tm = re.match(r"\s*:\s*tensor<([0-9x]+)xi64>", attrs[end:])
  if not tm:
    raise ValueError(f"cannot find the type of {key} in {attrs[m.start():end + 40]!r}")
  shape = tuple(int(v) for v in tm.group(1).split("x"))
  if value.startswith('"0x'):
    raw = bytes.fromhex(value[3:-1])
    arr = np.frombuffer(raw, dtype="<i8")
    if arr.size == 1:
      arr = np.full(shape, arr[0])
    return arr.reshape(shape).astype(np.int64)
  if value.startswith("["):
    nums = [int(v) for v in re.findall(r"-?\d+", value)]
    return np.asarray(nums, dtype=np.int64).reshape(shape)
  return np.full(shape, int(value), dtype=np.int64)  # splat


def parse_stablehlo(text: str, n_devices: Optional[int] = None) -> list[Collective]:
  """Collectives of a lowered StableHLO module (`jax.jit(f).lower(*args).as_text()`).

  These carry the dtypes the program asked for (no backend widening), so their bytes are the
  accelerator's.

  Args:
    text: MLIR text in the generic op form (`"stablehlo.all_to_all"(%x) <{...}> : (...) -> ...`).
    n_devices: total devices, for a collective with empty replica groups; default: the
      module's `mhlo.num_partitions` x `mhlo.num_replicas`.

  Returns:
    One `Collective` per op, `source` = "stablehlo", in text order.

  Raises:
    ValueError: an op whose attributes or type signature cannot be parsed.
  """
  if n_devices is None:
    parts = re.search(r"mhlo\.num_partitions\s*=\s*(\d+)", text)
    reps = re.search(r"mhlo\.num_replicas\s*=\s*(\d+)", text)
    n_devices = (int(parts.group(1)) if parts else 1) * (int(reps.group(1)) if reps else 1)
  out = []
  for m in re.finditer(r"(%[\w#:]+)?\s*=?\s*\"(stablehlo\.[a-z_]+)\"\(", text):
    opcode = m.group(2)
    if opcode not in _MLIR_OPCODES:
      continue
    kind = _MLIR_OPCODES[opcode]
    i = _balanced(text, m.end() - 1, "(", ")")
    attrs = ""
    j = i
    while j < len(text) and text[j] in " \n":
      j += 1
    if text.startswith("<{", j):
      k = _balanced(text, j, "<", ">")
      attrs = text[j:k]
      j = k
    while j < len(text) and text[j] in " \n":
      j += 1
    if text.startswith("({", j):  # reduction region
      j = _balanced(text, j, "(", ")")
    sig = re.match(r"\s*:\s*", text[j:])
    if not sig:
      raise ValueError(f"no type signature after {opcode} at offset {m.start()}")
    j += sig.end()
    k = _balanced(text, j, "(", ")")
    operands = _mlir_types(text[j:k])
    arrow = re.match(r"\s*->\s*", text[k:])
    if not arrow:
      raise ValueError(f"no result type after {opcode} at offset {m.start()}")
    r0 = k + arrow.end()
    r1 = _balanced(text, r0, "(", ")") if text[r0] == "(" else text.index(">", r0) + 1
    results = _mlir_types(text[r0:r1])
    if kind in ("collective-permute", "collective-broadcast") and "source_target_pairs" in attrs:
      comps = _permute_components(_dense_groups(attrs, "source_target_pairs").tolist())
      groups, size = _groups_tuple(comps), max(len(c) for c in comps)
    else:
      arr = _dense_groups(attrs, "replica_groups")
      if arr is None or arr.size == 0:
        arr = np.arange(n_devices, dtype=np.int64)[None]
      groups, size = _groups_tuple(arr), int(arr.shape[1])
    out.append(Collective(kind=kind, name=m.group(1) or "", source="stablehlo",
                          group_size=size, num_groups=len(groups), groups=groups,
                          operands=operands, results=results, opcode=opcode))
  return out


# ------------------------------------------------------------------------- analysis


def analyze(lowered, compiled=None) -> dict[str, list[Collective]]:
  """Both views of one program.

  Args:
    lowered: `jax.jit(f).lower(*args)` (a `jax.stages.Lowered`).
    compiled: its `.compile()` result, if already built (compiling again costs the same time).

  Returns:
    {"hlo": parse_hlo(compiled text), "stablehlo": parse_stablehlo(lowered text)}.
  """
  compiled = lowered.compile() if compiled is None else compiled
  return {"hlo": parse_hlo(compiled.as_text()), "stablehlo": parse_stablehlo(lowered.as_text())}


def distinct_partitions(collectives: Iterable[Collective], n_devices: Optional[int] = None
                        ) -> list[tuple[tuple[int, ...], ...]]:
  """The distinct device partitions (sets of groups) the collectives use, groups of one dropped.

  A multi-process CPU runtime (gloo) opens one communicator per distinct group, so this is the
  list to size its connections by (`launch.estimate_open_files`). A collective-permute counts
  as one group of all `n_devices` devices when given (XLA:CPU's gloo path builds its
  communicator over every device, as observed with jax 0.10.2), else as its connected sets.
  """
  seen = OrderedDict()
  for c in collectives:
    if c.kind in ("collective-permute", "collective-broadcast") and n_devices:
      key = (tuple(range(n_devices)),)
    else:
      key = tuple(sorted(c.groups))
    if max((len(g) for g in key), default=0) > 1:
      seen.setdefault(key, None)
  return list(seen)


def group_sizes(collectives: Iterable[Collective], n_devices: Optional[int] = None
                ) -> tuple[int, ...]:
  """Group size of each distinct partition (`distinct_partitions`), largest first."""
  return tuple(sorted((max(len(g) for g in p) for p in distinct_partitions(collectives,
                                                                             n_devices)),
                      reverse=True))


def summarize(collectives: Iterable[Collective]) -> list[dict]:
  """Identical collectives merged: one dict per (source, kind, group size, groups, operand
  types), with `count` and per-call bytes; in first-appearance order.

  Returns:
    dicts with keys source, kind, group_size, num_groups, count, operands (str), dtypes (str),
    operand_bytes, wire_bytes (per device per call), total_wire_bytes (count x wire_bytes).
  """
  rows: "OrderedDict[tuple, dict]" = OrderedDict()
  for c in collectives:
    ops = ", ".join(OrderedDict.fromkeys(str(a) for a in c.operands))
    n_ops = len(c.operands)
    ops_text = f"{n_ops} x {ops}" if n_ops > 1 and len(set(map(str, c.operands))) == 1 else ops
    key = (c.source, c.kind, c.group_size, c.num_groups, ops_text)
    if key not in rows:
      rows[key] = dict(source=c.source, kind=c.kind, group_size=c.group_size,
                       num_groups=c.num_groups, count=0, operands=ops_text,
                       dtypes="/".join(c.dtypes), operand_bytes=c.operand_bytes,
                       wire_bytes=c.wire_bytes, total_wire_bytes=0.0)
    rows[key]["count"] += 1
    rows[key]["total_wire_bytes"] += c.wire_bytes
  return list(rows.values())


def _fmt_bytes(b: float) -> str:
  if b == int(b):
    return f"{int(b):,}"
  return f"{b:,.1f}"


def collective_table(collectives: Iterable[Collective], title: Optional[str] = None) -> str:
  """A markdown table of `summarize(collectives)`: one row per distinct collective.

  Columns: source, kind, group size, groups, count, operands per device, bytes in per device
  per call, wire bytes per device per call (module docstring conventions), wire bytes per device
  over all calls.
  """
  rows = summarize(collectives)
  lines = []
  if title:
    lines += [title, ""]
  lines += ["| source | kind | group size | groups | count | operands (per device) | "
            "bytes in / device | wire bytes / device | x count |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['source']} | {r['kind']} | {r['group_size']:,} | {r['num_groups']:,} | "
                 f"{r['count']} | {r['operands']} | {_fmt_bytes(r['operand_bytes'])} | "
                 f"{_fmt_bytes(r['wire_bytes'])} | {_fmt_bytes(r['total_wire_bytes'])} |")
  if not rows:
    lines.append("| — | (no collectives) | | | | | | | |")
  return "\n".join(lines)
