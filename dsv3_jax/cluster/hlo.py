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

import dataclasses
import re
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import numpy as np

# Bytes per element of each HLO / StableHLO element type (sub-byte types as fractions).
_HLO_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "f4e2m1fn": 0.5, "f8e3m4": 1, "f8e4m3": 1, "f8e4m3fn": 1, "f8e4m3fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e5m2": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1, "token": 0,
}
_MLIR_DTYPES = {"i1": "pred", "i2": "s2", "i4": "s4", "i8": "s8", "i16": "s16", "i32": "s32",
                "i64": "s64", "ui2": "u2", "ui4": "u4", "ui8": "u8", "ui16": "u16",
                "ui32": "u32", "ui64": "u64", "f16": "f16", "bf16": "bf16", "f32": "f32",
                "f64": "f64"}

KINDS = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute",
         "collective-broadcast", "ragged-all-to-all")
_HLO_OPCODES = {k: k for k in KINDS}
_HLO_OPCODES.update({f"{k}-start": k for k in ("all-reduce", "all-gather", "collective-permute",
                                                "all-to-all", "reduce-scatter")})
_MLIR_OPCODES = {"stablehlo." + k.replace("-", "_"): k for k in KINDS}


# ----------------------------------------------------------------------------------- types


@dataclasses.dataclass(frozen=True)
class ArrayType:
  """One array operand or result: element type (HLO spelling, e.g. 'bf16') and dimensions."""

  dtype: str
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> float:
    """Size in bytes (sub-byte types count fractionally)."""
    try:
      item = _HLO_DTYPE_BYTES[self.dtype]
    except KeyError:
      raise ValueError(f"unknown element type {self.dtype!r} in HLO text; known: "
                       f"{sorted(_HLO_DTYPE_BYTES)}") from None
    return float(np.prod(self.shape, dtype=np.int64)) * item

  def __str__(self) -> str:
    return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of a program, as seen by one device.

  Attributes:
    kind: one of `KINDS` (async `-start` forms are reported under the base kind).
    name: the instruction's name in the text (`%all-to-all.1`, or `%5` in StableHLO).
    source: "hlo" (compiled HLO) or "stablehlo" (lowered, pre-optimisation).
    group_size: members per replica group (for a permute: the largest connected set of devices
      linked by its source-target pairs).
    num_groups: number of replica groups (permute: connected sets).
    groups: the groups as tuples of global device ids (permute: the connected sets).
    operands: operand array types; results: result array types (the per-peer chunks of a
      tuple-form all-to-all are listed one by one).
    computation: the HLO computation holding it (e.g. a while body), "" for StableHLO.
    opcode: the opcode as written (e.g. 'all-reduce-start', 'stablehlo.all_to_all').
  """

  kind: str
  name: str
  source: str
  group_size: int
  num_groups: int
  groups: tuple[tuple[int, ...], ...]
  operands: tuple[ArrayType, ...]
  results: tuple[ArrayType, ...]
  computation: str = ""
  opcode: str = ""

  @property
  def operand_bytes(self) -> float:
    """Bytes one device passes into the collective (sum over operands)."""
    return float(sum(a.nbytes for a in self.operands))

  @property
  def result_bytes(self) -> float:
    """Bytes one device gets out (derived from the operands for async `-start` forms, whose
    result tuple also holds the operand and context buffers)."""
    if not self.opcode.endswith("-start"):
      return float(sum(a.nbytes for a in self.results))
    s, b = self.group_size, self.operand_bytes
    return {"all-gather": s * b, "reduce-scatter": b / s}.get(self.kind, b)

  @property
  def wire_bytes(self) -> float:
    """Bytes one device sends to other devices per call (module docstring conventions)."""
    s, b = self.group_size, self.operand_bytes
    if s <= 1:
      return 0.0
    if self.kind in ("all-to-all", "ragged-all-to-all", "reduce-scatter"):
      return b * (s - 1) / s
    if self.kind == "all-gather":
      return b * (s - 1)
    if self.kind == "all-reduce":
      return 2.0 * b * (s - 1) / s
    return b  # collective-permute, collective-broadcast

  @property
  def dtypes(self) -> tuple[str, ...]:
    """Distinct operand element types, in order of appearance."""
    return tuple(OrderedDict.fromkeys(a.dtype for a in self.operands))


# ----------------------------------------------------------------------------- helpers


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
  """Index just past the bracket matching text[start] (which must be open_ch)."""
  if text[start] != open_ch:
    raise ValueError(f"expected {open_ch!r} at offset {start} of the HLO text")
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c == open_ch:
      depth += 1
    elif c == close_ch:
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced {open_ch}{close_ch} in the HLO text from offset {start}")


_HLO_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


def _hlo_types(type_text: str) -> tuple[ArrayType, ...]:
  """Array types in an HLO type string (a tuple yields each element; layouts are skipped)."""
  text = re.sub(r"/\*.*?\*/", "", type_text)
  text = re.sub(r"\{[^{}]*\}", "", text)  # layouts {1,0} (possibly with tiling)
  out = []
  for m in _HLO_ARRAY.finditer(text):
    if m.group(1) in _HLO_DTYPE_BYTES:
      dims = tuple(int(d) for d in m.group(2).split(",") if d)
      out.append(ArrayType(m.group(1), dims))
  return tuple(out)


def _iota_groups(spec: str) -> np.ndarray:
  """`[G,S]<=[d0,...]T(p0,...)` -> [G, S] int array of device ids."""
  m = re.fullmatch(r"\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", spec.replace(" ", ""))
  if not m:
    raise ValueError(f"cannot parse iota replica groups {spec!r}")
  out_shape = tuple(int(v) for v in m.group(1).split(","))
  dims = tuple(int(v) for v in m.group(2).split(","))
  if int(np.prod(dims)) != int(np.prod(out_shape)):
    raise ValueError(f"iota replica groups {spec!r}: {out_shape} groups do not hold the "
                     f"{int(np.prod(dims))} devices of {dims}")
  ids = np.arange(int(np.prod(dims)), dtype=np.int64).reshape(dims)
  if m.group(3):
    ids = ids.transpose(tuple(int(v) for v in m.group(3).split(",")))
  return ids.reshape(out_shape if len(out_shape) == 2 else (1, -1))


def _mesh_groups(spec: str) -> np.ndarray:
  """`mesh['a'=4,'b'=8] {'a'}` (optionally `'a':(pre)size` sub-axes and a `device_ids=(...)`
  clause) -> [G, S] device ids.

  The mesh's devices are numbered row-major (an iota over the axis sizes) unless
  `device_ids=([d0,..]T(p0,..))` (an iota, optionally transposed) or `device_ids=(i0,i1,...)`
  lists them; each group varies the listed axes (major to minor as listed) with every other
  axis fixed.
  """
  m = re.fullmatch(r"mesh\[(.*?)\]\s*(?:,\s*device_ids=\((.*?)\))?\s*\{(.*?)\}", spec.strip(),
                   flags=re.S)
  if not m:
    raise ValueError(f"cannot parse mesh replica groups {spec!r}")
  axes = OrderedDict()
  for name, size in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1)):
    axes[name] = int(size)
  n = int(np.prod(list(axes.values()))) if axes else 1
  if m.group(2):
    ids_spec = m.group(2).replace(" ", "")
    if ids_spec.startswith("["):
      iota = re.fullmatch(r"\[([0-9,]+)\](?:T\(([0-9,]+)\))?", ids_spec)
      if not iota:
        raise ValueError(f"cannot parse mesh device_ids in {spec!r}")
      dims = tuple(int(v) for v in iota.group(1).split(","))
      ids = np.arange(int(np.prod(dims)), dtype=np.int64).reshape(dims)
      if iota.group(2):
        ids = ids.transpose(tuple(int(v) for v in iota.group(2).split(",")))
      device_ids = ids.reshape(-1)
    else:
      device_ids = np.asarray([int(v) for v in ids_spec.split(",") if v], dtype=np.int64)
    if device_ids.size != n:
      raise ValueError(f"mesh replica groups {spec!r}: {device_ids.size} device ids for a mesh "
                       f"of {n} devices")
  else:
    device_ids = np.arange(n, dtype=np.int64)
  # Split sub-axes 'a':(pre)size into (pre, size, rest) pieces.
  wanted = re.findall(r"'([^']+)'(?::\((\d+)\)(\d+))?", m.group(3))
  split = {}
  for name, pre, size in wanted:
    if name not in axes:
      raise ValueError(f"replica groups name axis {name!r}, not in the mesh {dict(axes)}")
    if pre:
      pre, size = int(pre), int(size)
      if axes[name] % (pre * size):
        raise ValueError(f"sub-axis {name!r}:({pre}){size} does not divide axis size "
                         f"{axes[name]} in {spec!r}")
      split[name] = (pre, size, axes[name] // (pre * size))
  shape, labels = [], []
  for name, size in axes.items():
    if name in split:
      for j, s in enumerate(split[name]):
        shape.append(s)
        labels.append((name, j))
    else:
      shape.append(size)
      labels.append((name, None))
  pieces = [labels.index((name, 1 if pre else None)) for name, pre, _ in wanted]
  ids = device_ids.reshape(shape)
  rest = [i for i in range(len(shape)) if i not in pieces]
  ids = ids.transpose(rest + pieces)
  group = int(np.prod([shape[i] for i in pieces])) if pieces else 1
  return ids.reshape(-1, group)


def _explicit_groups(spec: str) -> list[list[int]]:
  inner = spec.strip()
  if inner in ("{}", ""):
    return []
  return [[int(v) for v in g.split(",") if v.strip()]
          for g in re.findall(r"\{([0-9,\s]*)\}", inner[1:-1])]


def _permute_components(pairs: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
  """Connected sets of devices linked by (source, target) pairs."""
  parent: dict[int, int] = {}

  def find(a):
    parent.setdefault(a, a)
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  for s, t in pairs:
    parent[find(s)] = find(t)
  comps: dict[int, list[int]] = {}
  for d in sorted(parent):
    comps.setdefault(find(d), []).append(d)
  return [tuple(c) for c in comps.values()]


def _groups_tuple(groups) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(int(v) for v in g) for g in groups)


def _attr_value(text: str, key: str) -> Optional[str]:
  """The raw value of `key=` in an HLO attribute list (balanced braces / brackets)."""
  m = re.search(rf"(?:^|[\s,]){re.escape(key)}=", text)
  if not m:
    return None
  i = m.end()
  if text.startswith("mesh[", i):
    j = _balanced(text, i + 4, "[", "]")
    d = re.match(r",\s*device_ids=", text[j:])
    if d:
      j = _balanced(text, j + d.end(), "(", ")")
    while j < len(text) and text[j] == " ":
      j += 1
    return text[i:_balanced(text, j, "{", "}")]
  if text[i] == "{":
    return text[i:_balanced(text, i, "{", "}")]
  if text[i] == "[":
    j = _balanced(text, i, "[", "]")
    if text.startswith("<=", j):
      j = _balanced(text, j + 2, "[", "]")
      if text.startswith("T(", j):
        j = _balanced(text, j + 1, "(", ")")
    return text[i:j]
  m2 = re.match(r"[^,\s]*", text[i:])
  return m2.group(0)


def _groups_from_hlo_attr(spec: Optional[str], n_devices: int) -> np.ndarray:
  if spec is None or spec.strip() in ("{}", ""):
    if n_devices <= 0:
      raise ValueError("the collective has no replica_groups (all devices) and the module "
                       "header gives no num_partitions / replica_count; pass n_devices")
    return np.arange(n_devices, dtype=np.int64)[None]
  spec = spec.strip()
  if spec.startswith("mesh["):
    return _mesh_groups(spec)
  if spec.startswith("["):
    return _iota_groups(spec)
  groups = _explicit_groups(spec)
  sizes = {len(g) for g in groups}
  if len(sizes) != 1:
    raise ValueError(f"replica groups of unequal sizes {sorted(sizes)} are not supported")
  return np.asarray(groups, dtype=np.int64)


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
