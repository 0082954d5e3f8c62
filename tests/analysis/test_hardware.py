"""Hardware constants against the numbers the papers and datasheets state."""

import pytest

from dsv3_jax.analysis import hardware


def test_h800():
  h = hardware.H800
  assert h.scale_up_bandwidth == 200e9  # 400 GB/s bidirectional NVLink
  assert h.scale_up_bandwidth_achieved == 160e9
  assert h.scale_out_bandwidth == 50e9  # one 400 Gb/s CX7 per GPU
  assert h.scale_out_bandwidth_effective == 40e9
  assert h.bf16_dense_flops == 989e12
  assert h.scale_out_bandwidth / h.scale_up_bandwidth_achieved == pytest.approx(1 / 3.2)


def test_gb200_and_h200():
  assert hardware.GB200_NVL72.scale_up_bandwidth == 900e9
  assert hardware.GB200_NVL72.scale_up_domain == 72
  assert hardware.H200.hbm_bytes == 141e9
  assert hardware.H200.scale_up_bandwidth == 450e9


def test_network_parts():
  assert hardware.CX7_400G.bandwidth == 50e9
  assert hardware.IB_SWITCH_RADIX == 64
  assert hardware.ROCE_SWITCH_RADIX == 128
  assert hardware.gbps_to_bytes_per_s(800) == 100e9
  assert hardware.RYZEN_AI_MAX_395.memory_bandwidth == 256e9


def test_invalid_inputs():
  with pytest.raises(ValueError, match="gbps"):
    hardware.gbps_to_bytes_per_s(0)
  with pytest.raises(ValueError, match="efficiency"):
    hardware.achieved(1e9, 1.5)
  assert hardware.achieved(50e9, 0.8) == 40e9
