"""The depthwise convolution of the Squeezeformer with a faster weight gradient on CPU.

oneDNN computes the forward pass and the input gradient of a channels-last depthwise
convolution quickly, but its weight gradient about seven times slower than the forward pass.
That gradient, ``dW[c, k] = sum_{b, t} g[b, t, c] * x_padded[b, t + k, c]``, is a depthwise
convolution of the padded input with the output gradient as kernel (the batch folded into the
channels: ``B * C`` channels, kernel length ``T``, output length ``K``), which the same fast kernel
runs; the ``B`` partial results are then summed. Same values as the native gradient up to float
rounding.

:class:`FastWeightGradDepthwiseConv1d` is :class:`MaskedDepthwiseConv1d` with this backward for
stride-1 training in float32 on CPU (outside autocast and ``torch.compile``); everywhere else it
runs the plain convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from codes.models.squeezeformer import MaskedDepthwiseConv1d, depthwise_conv_image

__all__ = ["FastWeightGradDepthwiseConv1d", "depthwise_conv_fast_weight_grad"]


class _DepthwiseConvFastWeightGrad(torch.autograd.Function):
    """Stride-1 depthwise convolution of ``(B, T, C)`` whose weight gradient is itself a convolution."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        y = F.conv2d(depthwise_conv_image(x), weight.unsqueeze(2), padding=(0, padding), groups=x.shape[2])
        return y.squeeze(2).transpose(1, 2)  # (B, C, 1, T) -> (B, T, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        b, t, c = x.shape
        k, p = weight.shape[-1], ctx.padding
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                depthwise_conv_image(grad.contiguous()),
                depthwise_conv_image(x),
                weight.unsqueeze(2),
                None,
                (1, 1),
                (0, p),
                (1, 1),
                False,
                (0, 0),
                c,
                (True, False, False),
            )[0]
            grad_x = grad_x.squeeze(2).transpose(1, 2)  # (B, C, 1, T) -> (B, T, C)
        if ctx.needs_input_grad[1]:
            padded = F.pad(x, (0, 0, p, p))  # (B, T + 2p, C)
            # channels-last image with B * C channels: memory order (step, batch, channel)
            image = padded.transpose(0, 1).reshape(1, t + 2 * p, b * c).transpose(1, 2).unsqueeze(2)
            kernels = grad.permute(0, 2, 1).reshape(b * c, 1, 1, t)  # one kernel per (b, c)
            partial = F.conv2d(image, kernels, groups=b * c)  # (1, B * C, 1, K)
            grad_weight = partial.view(b, c, k).sum(0).unsqueeze(1)  # (C, 1, K)
        return grad_x, grad_weight, None


def depthwise_conv_fast_weight_grad(x: torch.Tensor, weight: torch.Tensor, padding: int) -> torch.Tensor:
    """Stride-1 depthwise convolution, ``x (B, T, C), weight (C, 1, K) -> (B, T + 2 * padding - K + 1, C)``,
    with the weight gradient computed as a convolution."""
    return _DepthwiseConvFastWeightGrad.apply(x, weight, padding)


class FastWeightGradDepthwiseConv1d(MaskedDepthwiseConv1d):
    """:class:`MaskedDepthwiseConv1d` (same arguments, same state) whose stride-1 training in
    float32 on CPU uses :func:`depthwise_conv_fast_weight_grad`."""

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.stride[0] == 1
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):
            return depthwise_conv_fast_weight_grad(x, self.weight, self.padding[0])
        return super().convolve(x)
