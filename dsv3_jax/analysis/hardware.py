"""Hardware constants for the co-design cost models, each with its source.

Units: bytes, bytes per second (B/s), FLOP per second, seconds. Bandwidths are unidirectional per
GPU unless a name says otherwise. 1 GB = 1e9 bytes; 400 Gb/s = 50e9 B/s.

"Insights" is arXiv 2505.09343 (Zhao et al., "Insights into DeepSeek-V3: Scaling Challenges and
Reflections on Hardware for AI Architectures", ISCA 2025); "V3 report" is arXiv 2412.19437.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

GB = 1e9  # bytes (decimal, as the papers use)
TB = 1e12
TFLOPS = 1e12  # FLOP/s
Gbps = 1e9 / 8  # bytes per second in one gigabit per second


def gbps_to_bytes_per_s(gbps: float) -> float:
  """Converts a link rate in Gb/s to bytes per second (400 Gb/s -> 50e9 B/s).

  Raises:
    ValueError: if `gbps` is not positive.
  """
  if not gbps > 0:
    raise ValueError(f"gbps must be > 0, got {gbps!r}")
  return gbps * Gbps


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One GPU (or accelerator) and the links it owns.

  Attributes:
    name: label.
    bf16_dense_flops: peak dense BF16 tensor-core throughput, FLOP/s.
    fp8_dense_flops: peak dense FP8 throughput, FLOP/s.
    hbm_bytes: device memory, bytes.
    hbm_bandwidth: device memory bandwidth, B/s.
    scale_up_bandwidth: nominal unidirectional scale-up (NVLink) bandwidth per GPU, B/s.
    scale_up_bandwidth_achieved: measured / achievable unidirectional NVLink bandwidth, B/s.
    scale_up_domain: GPUs in one scale-up (NVLink) domain.
    scale_out_bandwidth: nominal scale-out (NIC) bandwidth per GPU, B/s.
    scale_out_bandwidth_effective: achievable scale-out bandwidth per GPU, B/s.
  """

  name: str
  bf16_dense_flops: float
  fp8_dense_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  scale_up_bandwidth: float
  scale_up_bandwidth_achieved: float
  scale_up_domain: int
  scale_out_bandwidth: float
  scale_out_bandwidth_effective: float


@dataclasses.dataclass(frozen=True)
class Nic:
  """A network interface card. `bandwidth` in B/s per port; `ports` physical ports."""

  name: str
  bandwidth: float
  ports: int = 1


@dataclasses.dataclass(frozen=True)
class Switch:
  """A network switch: `radix` ports of `port_bandwidth` B/s each."""

  name: str
  radix: int
  port_bandwidth: float
  fabric: str  # "infiniband" or "roce"


@dataclasses.dataclass(frozen=True)
class MemoryDevice:
  """A memory-bandwidth-bound device for local (batch-1) inference.

  Attributes:
    name: label.
    memory_bandwidth: B/s.
    memory_bytes: capacity in bytes.
  """

  name: str
  memory_bandwidth: float
  memory_bytes: float


# --------------------------------------------------------------------------- NICs and switches
# NVIDIA ConnectX-7: 400 Gb/s per port (NDR InfiniBand / 400GbE); Insights §4.1: one CX7 400G
# InfiniBand NIC per H800 GPU, 8 per node.
CX7_400G = Nic("ConnectX-7 400G", gbps_to_bytes_per_s(400))
# NVIDIA Quantum-2 QM9700 NDR InfiniBand switch: 64 ports of 400 Gb/s (Insights §5.1: "64-port
# 400G IB switches", the radix behind Table 3).
IB_SWITCH_NDR = Switch("InfiniBand NDR (Quantum-2, 64 x 400G)", 64, gbps_to_bytes_per_s(400),
                       "infiniband")
# 51.2 Tb/s Ethernet switch ASICs (Broadcom Tomahawk 5, NVIDIA Spectrum-4) give 128 ports of
# 400GbE (Insights §5.2: RoCE switches offer 128 ports of 400G against IB's 64).
ROCE_SWITCH_400G = Switch("RoCE 51.2T (128 x 400G)", 128, gbps_to_bytes_per_s(400), "roce")
IB_SWITCH_RADIX = IB_SWITCH_NDR.radix
ROCE_SWITCH_RADIX = ROCE_SWITCH_400G.radix

# --------------------------------------------------------------------------- GPUs
# H800 SXM5: the H100 SXM5 compute die (989 TFLOP/s dense BF16, 1979 dense FP8, 80 GB HBM3 at
# 3.35 TB/s, NVIDIA H100 datasheet) with NVLink cut to 400 GB/s bidirectional = 200 GB/s per
# direction (Insights §4.1). Achieved NVLink ~160 GB/s, 3.2x IB (V3 report §3.2.2). IB: one CX7
# 400 Gb/s NIC per GPU = 50 GB/s (V3 report §3.2.2), ~40 GB/s effective (Insights §4).
H800 = Accelerator(
    name="H800 SXM",
    bf16_dense_flops=989 * TFLOPS,
    fp8_dense_flops=1979 * TFLOPS,
    hbm_bytes=80 * GB,
    hbm_bandwidth=3.35 * TB,
    scale_up_bandwidth=200 * GB,
    scale_up_bandwidth_achieved=160 * GB,
    scale_up_domain=8,
    scale_out_bandwidth=CX7_400G.bandwidth,
    scale_out_bandwidth_effective=40 * GB,
)
# H200 SXM: same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s, NVLink 4 at 900 GB/s
# bidirectional = 450 GB/s per direction (NVIDIA H200 datasheet). No achieved-bandwidth figure is
# published in the papers: the achieved fraction of H800 (160/200) and of IB (40/50) is applied.
H200 = Accelerator(
    name="H200 SXM",
    bf16_dense_flops=989 * TFLOPS,
    fp8_dense_flops=1979 * TFLOPS,
    hbm_bytes=141 * GB,
    hbm_bandwidth=4.8 * TB,
    scale_up_bandwidth=450 * GB,
    scale_up_bandwidth_achieved=450 * GB * (160 / 200),
    scale_up_domain=8,
    scale_out_bandwidth=CX7_400G.bandwidth,
    scale_out_bandwidth_effective=CX7_400G.bandwidth * (40 / 50),
)
# GB200 NVL72, per Blackwell GPU: 72 GPUs in one NVLink 5 domain at 1.8 TB/s bidirectional =
# 900 GB/s per direction (Insights §2.3.2 uses 900 GB/s unidirectional); 180 PFLOP/s dense BF16
# and 360 dense FP8 per rack / 72 = 2.5 / 5 PFLOP/s per GPU; 13.4 TB HBM3e at 576 TB/s per rack
# = 186 GB at 8 TB/s per GPU (NVIDIA GB200 NVL72 datasheet). Scale-out: one 400G CX7 per GPU.
GB200_NVL72 = Accelerator(
    name="GB200 NVL72",
    bf16_dense_flops=2500 * TFLOPS,
    fp8_dense_flops=5000 * TFLOPS,
    hbm_bytes=186 * GB,
    hbm_bandwidth=8 * TB,
    scale_up_bandwidth=900 * GB,
    scale_up_bandwidth_achieved=900 * GB,
    scale_up_domain=72,
    scale_out_bandwidth=CX7_400G.bandwidth,
    scale_out_bandwidth_effective=CX7_400G.bandwidth * (40 / 50),
)

ACCELERATORS = {a.name: a for a in (H800, H200, GB200_NVL72)}

# --------------------------------------------------------------------------- scale-out generations
# InfiniBand generations, per-port data rate (InfiniBand Trade Association roadmap): EDR 100 Gb/s,
# HDR 200, NDR 400, XDR 800. Scale-up entries: H800 NVLink achieved 160 GB/s (above), H100/H200
# NVLink 4 450 GB/s per direction, GB200 NVL72 NVLink 5 900 GB/s per direction.
INTERCONNECTS = {
    "IB EDR 100G": gbps_to_bytes_per_s(100),
    "IB HDR 200G": gbps_to_bytes_per_s(200),
    "IB NDR 400G": gbps_to_bytes_per_s(400),
    "IB XDR 800G": gbps_to_bytes_per_s(800),
    "H800 NVLink (160 GB/s achieved)": H800.scale_up_bandwidth_achieved,
    "H100/H200 NVLink4 (450 GB/s)": H200.scale_up_bandwidth,
    "GB200 NVL72 NVLink5 (900 GB/s)": GB200_NVL72.scale_up_bandwidth,
}

# ------------------------------------------------------------------ latency (Insights Table 5)
# CPU-side end-to-end latency of a 64-byte transfer, seconds (Insights §5.2, Table 5). NVLink is
# intra-node only, so it has no cross-leaf entry.
LATENCY_64B = {
    ("roce", "same_leaf"): 3.6e-6,
    ("roce", "cross_leaf"): 5.6e-6,
    ("infiniband", "same_leaf"): 2.8e-6,
    ("infiniband", "cross_leaf"): 3.7e-6,
    ("nvlink", "same_leaf"): 3.33e-6,
}

# ------------------------------------------------------------------ local inference devices
# PC-class AI SoCs with unified memory (Insights §2.2.2: local deployment of MoE models).
# AMD Ryzen AI Max+ 395: 256-bit LPDDR5X-8000 = 8000e6 * 32 bytes = 256 GB/s, up to 128 GB.
RYZEN_AI_MAX_395 = MemoryDevice("AMD Ryzen AI Max+ 395 (256 GB/s)", 8000e6 * 256 / 8, 128 * GB)
# Apple M4 Max (16-core CPU variant): 546 GB/s unified memory bandwidth, up to 128 GB.
APPLE_M4_MAX = MemoryDevice("Apple M4 Max (546 GB/s)", 546 * GB, 128 * GB)
# Apple M3 Ultra: 819 GB/s, up to 512 GB.
APPLE_M3_ULTRA = MemoryDevice("Apple M3 Ultra (819 GB/s)", 819 * GB, 512 * GB)
LOCAL_DEVICES = {d.name: d for d in (RYZEN_AI_MAX_395, APPLE_M4_MAX, APPLE_M3_ULTRA)}


def achieved(bandwidth: float, efficiency: Optional[float] = None) -> float:
  """Scales a nominal bandwidth (B/s) by an efficiency in (0, 1] (None: 1).

  Raises:
    ValueError: if `bandwidth` <= 0 or `efficiency` is outside (0, 1].
  """
  if not bandwidth > 0:
    raise ValueError(f"bandwidth must be > 0 B/s, got {bandwidth!r}")
  if efficiency is None:
    return bandwidth
  if not 0 < efficiency <= 1:
    raise ValueError(f"efficiency must be in (0, 1], got {efficiency!r}")
  return bandwidth * efficiency
