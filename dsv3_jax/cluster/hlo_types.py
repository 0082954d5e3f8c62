"""The types of `dsv3_jax.cluster.hlo` and the replica-group syntaxes it decodes.

`ArrayType` (an operand's dtype and shape, its bytes) and `Collective` (one collective of a
program: kind, source, groups, operand and wire bytes; the byte conventions are in
`dsv3_jax.cluster.hlo`'s docstring), and the decoders of HLO / StableHLO replica groups
(explicit, iota with transpose, mesh-axes form, collective-permute pairs) shared by the two
parsers there.
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import Optional, Sequence

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
