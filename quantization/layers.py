"""The quantized linear layer and the optional INT8 output layer that the quantize transform swaps in.

Plain nn.Modules that fit any model whose linear layers follow the same small protocol (glm's do):
`reduce`, when set on the layer replaced (a row-parallel layer under tensor parallelism), sums the partial
products across ranks before the bias is added; `load_weight(name, tensor, dtype, device)` and
`finish_loading()` are the loader's hooks. A checkpoint tensor that does not fit is a ValueError.
`compute_device`, when set (weight offload sets it on the layers it streams), is where a layer computes
while its tensors are stored elsewhere (the CPU); `prepare(device)` lays the tensors out for the kernel of
a device (finish_loading calls it; memory planning calls it on the meta model to count what loading keeps).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from quantization.cpu import CPUKernel, native_kernels
from quantization.cuda import (
    CUDAKernel,
    Int4PackKernel,
    fused_int4_available,
    fused_int4_group_size,
    pack_int4,
)
from quantization.schemes import dequantize, quantize_to_stored, scale_groups
from quantization.spec import QuantizationSpec

Kernel = Callable[[Tensor, Tensor, Tensor], Tensor]


def make_kernel(bits: int, device: torch.device) -> Kernel:
    return CUDAKernel(bits) if device.type == "cuda" else CPUKernel(bits)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized: buffers `weight` (int8 [out, in], or [out, in / 2]
    packed INT4) and `weight_scale` (fp16 [out] or [out, groups]); the bias stays a float parameter. On a
    device that runs the fused INT4 kernel these two are replaced, once loaded, by `weight_int4pack` and
    `weight_int4pack_scale`, the kernel's own layout (`prepare`): the layer holds one copy of its weight.

    `load_weight` takes either a float `weight`, quantized on arrival (quantize while loading), or a
    quantized checkpoint's `weight` and `weight_scale` (any group count that divides the input columns, so
    a row-parallel layer merged from several shards loads exactly).
    """

    def __init__(
        self, linear: nn.Linear, spec: QuantizationSpec, from_quantized_checkpoint: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.spec = spec
        self.from_quantized_checkpoint = from_quantized_checkpoint
        self.reduce: Callable[[Tensor], Tensor] | None = getattr(linear, "reduce", None)
        device = linear.weight.device
        columns = spec.packed_columns(self.in_features)
        groups = spec.groups(self.in_features)
        scale_shape = (self.out_features,) if groups == 1 else (self.out_features, groups)
        self.register_buffer(
            "weight", torch.empty(self.out_features, columns, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float16, device=device))
        self.register_buffer("weight_int4pack", None)
        self.register_buffer("weight_int4pack_scale", None)
        self.compute_device: torch.device | None = None
        self.bias = linear.bias  # the original's load-then-quantize path lost it; kept here
        self._quantized_here = False
        self._kernel: Kernel | None = None
        self._cpu_weight: tuple | None = None  # cpu_weight()'s last answer, with what it was made from

    @classmethod
    def swap(
        cls, parent: nn.Module, name: str, spec: QuantizationSpec, from_quantized_checkpoint: bool
    ) -> None:
        setattr(parent, name, cls(getattr(parent, name), spec, from_quantized_checkpoint))

    def set_kernel(self, kernel: Kernel) -> None:
        """Use `kernel(x, weight, weight_scale)` for the matmul instead of the one chosen for the device
        (until the next `load_weight`, which chooses again)."""
        self._kernel = kernel

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}"
        if self.weight is None:
            return f"{shape}, int4pack groups of {self._kernel.group_size}"
        return f"{shape}, groups={scale_groups(self.weight_scale).shape[1]}"

    def _where(self) -> str:
        return f"{type(self).__name__} [{self.out_features} x {self.in_features}]"

    def load_weight(self, name: str, tensor: Tensor, dtype: torch.dtype, device: torch.device) -> None:
        if self.weight is None:
            raise ValueError(f"{self._where()}: '{name}' arrives after the weight was packed for its kernel")
        if name == "bias":
            self.bias = nn.Parameter(tensor.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        elif name == "weight" and tensor.is_floating_point():
            self._load_float_weight(tensor, device)
        elif name == "weight":
            self._load_quantized_weight(tensor, device)
        elif name == "weight_scale":
            self._load_scale(tensor, device)
        else:
            raise ValueError(f"{self._where()}: unexpected tensor '{name}'")
        self._kernel = None

    def _load_float_weight(self, tensor: Tensor, device: torch.device) -> None:
        if self.from_quantized_checkpoint:
            raise ValueError(
                f"{self._where()}: the checkpoint holds float weights, not quantized ones: drop "
                "--from-quantized-checkpoint (float weights are quantized while loading)"
            )
        if tensor.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"{self._where()}: checkpoint weight has shape {tuple(tensor.shape)} (wrong config, or a "
                "shard of another tensor-parallel size?)"
            )
        weight, scale = quantize_to_stored(tensor.to(device), self.spec)
        self._buffers["weight"], self._buffers["weight_scale"] = weight, scale
        self._quantized_here = True

    def _load_quantized_weight(self, tensor: Tensor, device: torch.device) -> None:
        if tensor.dtype != torch.int8:
            raise ValueError(f"{self._where()}: weight of dtype {tensor.dtype}; expected int8 or float")
        if tensor.shape != self.weight.shape:
            other = {self.in_features: 8, self.in_features // 2: 4}.get(tensor.shape[-1])
            hint = (
                f": it is an INT{other} checkpoint, pass --quantization-bit-width {other}"
                if other and other != self.spec.bits and tensor.shape[0] == self.out_features
                else " (wrong config, or a shard of another tensor-parallel size?)"
            )
            raise ValueError(
                f"{self._where()}: quantized weight has shape {tuple(tensor.shape)}, "
                f"INT{self.spec.bits} needs {tuple(self.weight.shape)}{hint}"
            )
        self._buffers["weight"] = tensor.to(device).contiguous()
        self._quantized_here = False

    def _load_scale(self, tensor: Tensor, device: torch.device) -> None:
        groups = scale_groups(tensor)
        count = groups.shape[1] if groups.dim() == 2 else 0
        width = self.in_features // count if count and self.in_features % count == 0 else 0
        if groups.shape[0] != self.out_features or not width or (self.spec.bits == 4 and width % 2):
            raise ValueError(
                f"{self._where()}: weight_scale of shape {tuple(tensor.shape)} does not fit the weight"
            )
        scale = tensor.squeeze(1) if tensor.dim() == 2 and count == 1 else tensor
        self._buffers["weight_scale"] = scale.to(device=device, dtype=torch.float16).contiguous()

    def finish_loading(self) -> None:
        if self.weight is None or self.weight.is_meta:
            return  # packed already, or the loader reports what is missing
        if self.weight_scale.is_meta:
            raise ValueError(
                f"{self._where()}: the checkpoint has int8 weights but no weight_scale: it is incomplete, or "
                "was written by a tool that drops the scales; re-convert it from the float checkpoint"
            )
        if self._quantized_here and self.from_quantized_checkpoint:
            raise ValueError(f"{self._where()}: float weights in a checkpoint loaded as quantized")
        self.prepare(self.compute_device or self.weight.device)

    def prepare(self, device: torch.device, fused_int4: bool | None = None) -> None:
        """Get ready to compute on `device` (`fused_int4`: whether it runs the fused INT4 kernel; None: ask
        the device). On the CPU the native kernels are built now (the first time: about a minute), not in
        the first request. Where the fused INT4 kernel runs and tinygemm tiles the shape, the weight is
        packed for it, on `device`, or on the weights' own device when that is not the CPU (meta for
        counting), and the stored weight and scale are dropped; the packed form stays where the weights
        live (on the CPU for a streamed layer, whose tensors offload copies to the GPU before each use)."""
        if device.type == "cpu":
            native_kernels()
            return
        if self.spec.bits != 4 or self.weight is None:
            return
        size = fused_int4_group_size(
            self.out_features, self.in_features, scale_groups(self.weight_scale).shape[1]
        )
        if fused_int4 is None:
            fused_int4 = size is not None and device.type == "cuda" and fused_int4_available(device)
        if size is None or not fused_int4:
            return  # CUDAKernel dequantises
        work = device if self.weight.device.type == "cpu" else self.weight.device
        packed, scales_zeros = pack_int4(self.weight, self.weight_scale, size, work)
        self._buffers["weight"] = self._buffers["weight_scale"] = None
        self._buffers["weight_int4pack"], self._buffers["weight_int4pack_scale"] = packed, scales_zeros
        self._kernel = Int4PackKernel(size)

    def cpu_weight(self) -> tuple[Tensor, Tensor] | None:
        """(weight, scale as [out, groups]) where this layer multiplies with the CPU kernel
        (quantization/cpu_gemv.h, whose group width must be a multiple of 32), so another caller of that
        kernel computes the same bits; None where it computes otherwise (packed for another kernel, a
        kernel set by `set_kernel`, weights off the CPU). Asked every decode step: kept until the weight,
        scale or kernel changes."""
        weight, scale, kernel = self._buffers["weight"], self._buffers["weight_scale"], self._kernel
        known = self._cpu_weight
        if known is not None and known[0] is weight and known[1] is scale and known[2] is kernel:
            return known[3]
        if kernel is None and weight is not None:  # chosen as `matmul` would choose it
            kernel = self._kernel = make_kernel(self.spec.bits, weight.device)
        found = None
        if weight is not None and weight.device.type == "cpu" and isinstance(kernel, CPUKernel):
            groups = scale_groups(scale)
            if (self.in_features // groups.shape[1]) % 32 == 0 and groups.is_contiguous():
                found = (weight, groups)
        self._cpu_weight = (weight, scale, kernel, found)
        return found

    def matmul(self, x: Tensor) -> Tensor:
        """x W^T with the layer's kernel (no autograd: the kernels are written for inference)."""
        if self.weight is None:  # packed by prepare, which chose the kernel
            return self._kernel(x, self.weight_int4pack, self.weight_int4pack_scale)
        if self._kernel is None:
            self._kernel = make_kernel(self.spec.bits, self.weight.device)
        return self._kernel(x, self.weight, self.weight_scale)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # an adapter trains through this frozen layer
            y = _FrozenQuantizedMatmul.apply(x, self)
        else:
            y = self.matmul(x)
        if self.reduce is not None:
            y = self.reduce(y)  # the bias is added once, after the sum over ranks
        return y if self.bias is None else y + self.bias


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """x W^T through a frozen quantized layer, differentiable in x only. The backward pass dequantizes W
    again (grad_x = grad_y W) instead of keeping a dequantized copy per layer from the forward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:
        ctx.layer = layer
        with torch.no_grad():
            return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        layer = ctx.layer
        if layer.weight is None:
            raise RuntimeError(
                f"{layer._where()}: its weight is packed for the fused INT4 kernel, which has no backward "
                "pass: train over INT8, or over INT4 on the CPU"
            )
        weight = dequantize(layer.weight, layer.weight_scale, layer.spec.bits, grad.dtype)  # [out, in]
        return grad @ weight, None


class QuantizedOutputLayer(nn.Module):
    """An output layer tied to `embedding` (logits = x embedding.weight^T) through its own INT8 per-row
    copy of the embedding's weight, made once that weight is loaded (input lookups stay full precision).
    Adds no state-dict keys. `gather`, when given, assembles the logits of a vocabulary-parallel shard."""

    def __init__(self, embedding: nn.Module, gather: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self._tied = [embedding]  # a list, so the embedding is not registered twice
        self.gather = gather
        self.spec = QuantizationSpec(8)
        self._kernel: Kernel | None = None

    @property
    def weight(self) -> Tensor:
        return self._tied[0].weight

    def finish_loading(self) -> None:
        weight, scale = quantize_to_stored(self.weight.detach(), self.spec)
        self.register_buffer("weight_q", weight, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self._kernel = make_kernel(8, weight.device)

    def forward(self, x: Tensor) -> Tensor:
        if self._kernel is None:
            raise RuntimeError("the INT8 output layer is used before its weights were loaded")
        logits = self._kernel(x, self.weight_q, self.weight_scale)
        return logits if self.gather is None else self.gather(logits)
