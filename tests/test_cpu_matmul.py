"""glm.cpu_matmul: the native decode matmul equals float64 reference math; dispatch falls back to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glm import cpu_matmul

native = cpu_matmul.native()
needs_native = pytest.mark.skipif(native is None, reason="no AVX2 or no compiler: the F.linear path is used")


def reference(x, w, b=None):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 13, 16, 17, 30, 131])  # from 17: the GEMM
@pytest.mark.parametrize(("n", "k"), [(1, 8), (7, 16), (64, 384), (1537, 1536)])
def test_native_equals_reference_math(dtype, rows, n, k):
    generator = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=generator)
    w = torch.randn(n, k, generator=generator).to(dtype)  # the reference widens the same stored values
    b = torch.randn(n, generator=generator)
    for bias in (None, b):
        y = native.linear(x, w, bias)
        expected = reference(x, w, bias)
        assert y.dtype == torch.float32 and y.shape == (rows, n)
        if rows % 2 == 0:  # leading dims are kept: [2, rows / 2, k] -> [2, rows / 2, n]
            torch.testing.assert_close(
                native.linear(x.view(2, rows // 2, k), w, bias), y.view(2, rows // 2, n)
            )
        # fp32 products and sums in another order than float64: relative error of a k-term fp32 dot product
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-6 * k**0.5 * expected.abs().max())


@needs_native
def test_linear_takes_the_native_path_without_autograd(monkeypatch):
    calls = []
    real = native.linear

    class Spy:
        def linear(self, *args):
            calls.append(args[0].numel() // args[0].shape[-1])  # rows
            return real(*args)

    monkeypatch.setattr(cpu_matmul, "native", lambda: Spy())
    w, b = torch.randn(24, 32), torch.randn(24)
    for shape in [(1, 32), (2, 3, 32), (4, 4, 32), (17, 32)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(cpu_matmul.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls == [1, 6, 16, 17]
    x = torch.randn(2, 32, requires_grad=True)
    cpu_matmul.linear(x, w, b).sum().backward()  # autograd: F.linear, with gradients
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1))
    assert calls == [1, 6, 16, 17]
    cpu_matmul.linear(torch.randn(2, 32), w.t().contiguous().t(), b)  # non-contiguous weight: F.linear
    cpu_matmul.linear(torch.randn(2, 32, dtype=torch.float64), w.double())  # fp64 activations: F.linear
    assert calls == [1, 6, 16, 17]


def test_fallback_widens_a_half_weight_when_the_native_path_is_off(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "native", lambda: None)
    x, w = torch.randn(3, 16), torch.randn(5, 16).half()
    torch.testing.assert_close(cpu_matmul.linear(x, w), F.linear(x, w.float()))


@needs_native
def test_the_custom_op_for_torch_compile_passes_torch_opcheck():
    x, w, b = torch.randn(3, 16), torch.randn(5, 16).half(), torch.randn(5)
    torch.library.opcheck(cpu_matmul.native_linear, (x, w, b))
    torch.library.opcheck(cpu_matmul.native_linear, (x, w.float(), None))
    torch.testing.assert_close(cpu_matmul.native_linear(x, w, b), F.linear(x, w.float(), b))


def test_the_isa_override_forces_a_path_or_names_what_is_supported(monkeypatch):
    from quantization import native as build

    monkeypatch.setenv("GLM_NATIVE_ISA", "none")
    assert build.selected_isa() is None
    monkeypatch.setenv("GLM_NATIVE_ISA", "auto")
    assert build.selected_isa() == (build.supported_isas() or [None])[-1]
    monkeypatch.setenv("GLM_NATIVE_ISA", "avx9000")
    with pytest.raises(ValueError, match="GLM_NATIVE_ISA=avx9000: choose auto, none or avx2, avx512"):
        build.selected_isa()
    monkeypatch.setattr(build, "supported_isas", lambda: [])
    monkeypatch.setenv("GLM_NATIVE_ISA", "avx2")
    with pytest.raises(ValueError, match="this CPU lacks it"):
        build.selected_isa()


@needs_native
def test_the_gemm_result_does_not_depend_on_the_thread_count():
    # every output element is one thread's FMA chain over k in order (glm/kernels/gemm.h)
    generator = torch.Generator().manual_seed(7)
    x, w = torch.randn(64, 520, generator=generator), torch.randn(200, 520, generator=generator).half()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear(x, w)
        torch.set_num_threads(2)
        two = native.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_the_avx512_build_compiles(tmp_path):
    """This CPU may lack AVX-512, so the AVX-512 kernels cannot run here; they must at least compile (the
    same source as the AVX2 build, which the tests above run)."""
    import shutil
    import subprocess
    import sysconfig
    from pathlib import Path

    from torch.utils.cpp_extension import include_paths

    from quantization.native import ISA_FLAGS

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = Path(cpu_matmul.__file__).parent
    sources = [root / "kernels" / "module.cpp", root.parent / "quantization" / "cpu_kernels.cpp"]
    includes = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], root / "kernels"]]
    for source in sources:
        command = [compiler, "-std=c++17", "-fsyntax-only", *ISA_FLAGS["avx512"], *includes, str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]


@needs_native
@pytest.mark.parametrize(
    ("bits", "scheme", "group_size"), [(8, "row", None), (4, "row", None), (8, "group", 64), (4, "group", 32)]
)
@pytest.mark.parametrize("rows", [1, 9, 17, 131])
@pytest.mark.parametrize(("n", "k"), [(7, 64), (1537, 1536)])
def test_the_quantized_gemm_is_the_dense_gemm_of_the_dequantised_weight(bits, scheme, group_size, rows, n, k):
    from quantization.schemes import dequantize, quantize_weight, scale_groups, stored_weight
    from quantization.spec import QuantizationSpec

    generator = torch.Generator().manual_seed(rows * 10 + bits)
    values, scale = quantize_weight(
        torch.randn(n, k, generator=generator), QuantizationSpec(bits, scheme, group_size)
    )
    weight = stored_weight(values, bits)
    x = torch.randn(rows, k, generator=generator)
    y = cpu_matmul.quantized_linear(x, weight, scale_groups(scale).contiguous(), bits)
    dense = dequantize(weight, scale, bits)  # exact in fp32
    # The packed tiles are dequantised exactly, so the result is the fp32 GEMM's bit for bit (the dense
    # linear runs the GEMM from 17 rows, the weight-streaming kernel below) ...
    if rows >= 17:
        assert torch.equal(y, native.linear(x, dense, None))
    # ... which is fp32 math: within a k-term fp32 dot product's rounding of the float64 result
    expected = reference(x, dense)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-6 * k**0.5 * expected.abs().max())


@needs_native
def test_quantized_prefill_runs_the_registered_gemm(monkeypatch):
    from quantization import cpu
    from quantization.schemes import dequantize, quantize_weight
    from quantization.spec import QuantizationSpec

    calls = []

    def spy(*args):
        calls.append(args[0].shape[0])
        return cpu_matmul.quantized_linear(*args)

    monkeypatch.setattr(cpu, "_prefill_gemm", [spy])
    weight, scale = quantize_weight(torch.randn(96, 64), QuantizationSpec(8))
    x = torch.randn(20, 64)
    y = cpu.CPUKernel(8)(x, weight, scale)
    assert calls == [20] and torch.equal(y, native.linear(x, dequantize(weight, scale, 8), None))
    cpu.CPUKernel(8)(x.bfloat16(), weight, scale)  # bf16 prefill: torch's matmul in bf16, not the fp32 GEMM
    assert calls == [20]
