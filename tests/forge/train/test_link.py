"""The link and matmul speeds the offload plan reads, measured on a GPU."""

import pytest
import torch

from forge.train.link import LinkSpeed, measure_link


def test_the_line_names_both_rates():
    assert LinkSpeed(55.2e9, 780e12).line() == "copies to pinned memory at 55.2 GB/s, bf16 matmuls at 780 TFLOP/s"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measured_rates_are_those_of_a_real_link_and_gpu():
    speed = measure_link(torch.device("cuda"))
    assert 1e9 < speed.copy_bytes_per_s < 1e12  # PCIe or NVLink-C2C, not a cached no-op
    assert 1e12 < speed.matmul_flops_per_s < 1e16
