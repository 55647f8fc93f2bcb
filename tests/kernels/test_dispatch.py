"""The public kernels pick the torch path on CPU tensors, can be forced onto triton, and never load triton
in a CPU-only process."""

import os
import subprocess
import sys

import pytest
import torch

import kernels


def test_cpu_tensors_take_the_torch_path_without_importing_triton():
    script = (
        "import sys, torch, kernels\n"
        "x = torch.randn(2, 8)\n"
        "kernels.rms_norm(x, torch.ones(8), 1e-5)\n"
        "kernels.silu_and_mul(x)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "SANSLLM_KERNELS")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_backend_can_be_forced_and_restored():
    before = kernels.get_backend()
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("torch"):
            assert kernels.get_backend() == "torch"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == before
    with pytest.raises(ValueError):
        kernels.set_backend("cuda")


def test_every_public_kernel_gives_the_same_answer_on_both_backends():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=generator)
    weight = torch.randn(64, generator=generator)
    positions = torch.arange(5)
    q, k = torch.randn(5, 4 * 16, generator=generator), torch.randn(5, 2 * 16, generator=generator)
    cache = kernels.compute_cos_sin_cache(16, 32, 10000.0)
    logits = torch.randn(3, 100, generator=generator)
    params = (torch.tensor([0.0, 1.0, 0.8]), torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.9]), torch.zeros(3))

    def run():
        key_cache, value_cache = kernels.allocate_kv_cache(2, 16, 2, 16)
        kernels.reshape_and_cache(k.view(5, 2, 16), k.view(5, 2, 16), key_cache, value_cache, torch.arange(5))
        penalised = kernels.apply_penalties(
            logits.clone(), torch.tensor([[1, 2, -1]] * 3), torch.tensor([[3]] * 3), torch.full((3,), 1.2),
            torch.full((3,), 0.1), torch.full((3,), 0.1),
        )
        generators = [torch.Generator().manual_seed(row) for row in range(3)]
        return [
            kernels.rms_norm(x, weight, 1e-5),
            *kernels.rms_norm(x, weight, 1e-5, x),
            kernels.silu_and_mul(x),
            *kernels.rotary_embedding(positions, q, k, cache, 16),
            key_cache,
            kernels.paged_attention(
                q.view(5, 4, 16), key_cache, value_cache, torch.tensor([[0]], dtype=torch.int32),
                torch.tensor([5], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32), 0.25, 5, 5,
            ),
            penalised,
            kernels.apply_sampling_masks(penalised, *params),
            kernels.sample(penalised, *params, generators),
        ]

    with kernels.use_backend("torch"):
        expected = run()
    with kernels.use_backend("triton"):
        got = run()
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=lambda m, i=index: f"output {i}: {m}")
