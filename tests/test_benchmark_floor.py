"""The floor under the zero NAMM in ``namm bench``: the kernels it must run at each update."""

from __future__ import annotations

from tiny_models import tiny_model
from namm.benchmark import mandatory_kernel_seconds


def test_floor_times_one_kernel_pair_per_update_and_none_before_the_first():
    model = tiny_model("llama-gqa")
    assert mandatory_kernel_seconds(model, 511, repeats=3) == {"bam_attention_s": 0.0, "stft_matmul_s": 0.0}
    one = mandatory_kernel_seconds(model, 512, repeats=3)
    three = mandatory_kernel_seconds(model, 1536, repeats=3)
    assert one["bam_attention_s"] > 0 and one["stft_matmul_s"] > 0
    assert three["stft_matmul_s"] > one["stft_matmul_s"]  # three updates, over 512, 1,024 and 1,536 tokens
