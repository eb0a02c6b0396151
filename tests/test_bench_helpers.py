"""``namm bench`` helpers: the floor under the zero NAMM (the kernels it must run at each update)
and the peak memory of a call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from namm.benchmark import mandatory_kernel_seconds, peak_memory


def test_floor_times_one_kernel_pair_per_update_and_none_before_the_first():
    model = tiny_model("llama-gqa")
    assert mandatory_kernel_seconds(model, 511, repeats=3) == {"bam_attention_s": 0.0, "stft_matmul_s": 0.0}
    one = mandatory_kernel_seconds(model, 512, repeats=3)
    three = mandatory_kernel_seconds(model, 1536, repeats=3)
    assert one["bam_attention_s"] > 0 and one["stft_matmul_s"] > 0
    assert three["stft_matmul_s"] > one["stft_matmul_s"]  # three updates, over 512, 1,024 and 1,536 tokens


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak resident set is read from Linux /proc")
def test_peak_memory_counts_allocations_that_reuse_freed_heap():
    """Freed small blocks stay resident in the C heap; a call that reuses them must still count."""
    freed = [torch.ones(16 << 10) for _ in range(2000)]  # 2,000 blocks of 64 KiB, then freed
    del freed
    held: list[torch.Tensor] = []
    _, peak = peak_memory(lambda: held.extend(torch.ones(16 << 10) for _ in range(1000)), torch.device("cpu"))
    assert peak >= 48 << 20  # 1,000 blocks of 64 KiB held at the end of the call
