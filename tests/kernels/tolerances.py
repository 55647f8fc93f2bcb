"""assert_close tolerances for comparing an interpreted triton kernel with the torch path."""

import torch

# triton 3.9's interpreter rounds float32 -> bfloat16 by truncation where the GPU rounds to nearest even,
# so a bfloat16 result may sit one ulp (2**-7 relative) away per rounding step; two steps at most here.
BF16_TOLERANCE = {"atol": 1e-2, "rtol": 2 * 2**-7}
FP32_TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# float16 keeps 11 significant bits: two roundings of one ulp (2**-10 relative) at most, as for bfloat16
FP16_TOLERANCE = {"atol": 1e-3, "rtol": 2 * 2**-10}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    if dtype == torch.float16:
        return FP16_TOLERANCE
    return BF16_TOLERANCE if dtype == torch.bfloat16 else FP32_TOLERANCE
