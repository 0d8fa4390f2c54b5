"""Building blocks of DiMR: time-dependent parameters and norms, GEGLU, attention, the two block kinds,
and the cross-branch upsampler.

Time enters only through the norms. It is passed explicitly as `tau` ([B] or [1], in (-1, 1]); a
module never stores a "current time". Activations are channels-last ([..., D]) throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def tdp_gate(tau: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s = sigmoid((1 + w) tau + b): the per-channel mixing gate of a time-dependent parameter."""
    return torch.sigmoid((1 + w) * tau[:, None] + b)  # (B, D)


def grad_free() -> bool:
    """True where no autograd graph is recorded (sampling under no_grad or inference_mode). A forward
    may then update in place the fresh intermediates it alone holds: fewer full-size allocations, and
    on a CPU fewer page faults where the allocator returns freed memory to the system."""
    return not torch.is_grad_enabled()


def residual(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """x + f(x), summed into f(x)'s fresh buffer where that is allowed and gives the same values
    (no graph recorded, same dtype; addition commutes exactly)."""
    if grad_free() and fx.dtype == x.dtype and fx.shape == x.shape:
        return fx.add_(x)
    return x + fx


def broadcast_channels(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample channel vector (B, D) so it broadcasts against channels-last x (B, ..., D)."""
    return v.view(v.shape[0], *([1] * (x.ndim - 2)), v.shape[1])


class TimeDependentParameter(nn.Module):
    """value(tau) = s p0 + (1 - s) p1 with s = sigmoid((1 + w) tau + b), all per channel.

    Starts as a plain parameter (p0 = p1 = init, w = b = 0). `w` and `b` are excluded from weight decay.
    """

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.p0 = nn.Parameter(torch.full((dim,), float(init)))
        self.p1 = nn.Parameter(torch.full((dim,), float(init)))
        self.w = nn.Parameter(torch.zeros(dim))
        self.b = nn.Parameter(torch.zeros(dim))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        s = tdp_gate(tau, self.w, self.b)  # (B, D)
        return torch.lerp(self.p1, self.p0, s)  # (B, D): s p0 + (1 - s) p1


class TDRMSNorm(nn.Module):
    """y = x / (rms(x) + 1e-8) * gamma(tau): scale only, epsilon added to the rms (as released)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.scale = TimeDependentParameter(dim, 1.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # rms = |x| / sqrt(D): one reduction, and one full-size multiply by its small reciprocal.
        rms = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True) * x.shape[-1] ** -0.5  # (B, ..., 1)
        y = (x.float() * (rms + self.eps).reciprocal()).to(x.dtype)  # (B, ..., D), fresh
        gamma = broadcast_channels(self.scale(tau), x).to(x.dtype)
        return y.mul_(gamma) if grad_free() else y * gamma


class TDLayerNorm(nn.Module):
    """Layer norm (eps 1e-5) whose weight and bias are time-dependent parameters."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = TimeDependentParameter(dim, 1.0)
        self.bias = TimeDependentParameter(dim, 0.0)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.weight(tau), self.bias(tau)  # (B, D) or (1, D)
        if gamma.shape[0] == 1:  # one time for the batch (sampling): a plain affine layer norm, one kernel
            return F.layer_norm(x, (self.dim,), gamma[0].to(x.dtype), beta[0].to(x.dtype), self.eps)
        y = F.layer_norm(x, (self.dim,), eps=self.eps)  # (B, ..., D)
        return torch.addcmul(broadcast_channels(beta, x).to(y.dtype), y, broadcast_channels(gamma, x).to(y.dtype))


class GEGLU(nn.Module):
    """Pre-norm gated MLP: w2(gelu(w0 n) * w1 n) with n = TD-RMSNorm(x); exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = TDRMSNorm(dim)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        n = self.norm(x, tau)  # (B, ..., D)
        h, g = F.gelu(self.w0(n)), self.w1(n)  # (B, ..., H) each, fresh
        return self.w2(h.mul_(g) if grad_free() else h * g)  # (B, ..., D)


def first_query_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q_0 k^T / sqrt(d)) in float32: token 0's attention probabilities over all N keys.
    q, k: (B, h, N, d) -> (B, h, N). The same scaling as `scaled_dot_product_attention`."""
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * q.shape[-1] ** -0.5  # (B, h, N)
    return logits.softmax(-1)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention: one bias-free qkv projection laid out [q | k | v], head-major.

    `probe`, if a list, receives token 0's attention probabilities (B, h, N) in float32, computed from
    the very q and k this forward attends with (`first_query_attention`); the output is unchanged."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = TDRMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, probe: list[torch.Tensor] | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(self.norm(x, tau))  # (B, N, 3D)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        if probe is not None:
            probe.append(first_query_attention(q, k))  # (B, h, N)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attn = Attention(dim, heads)
        self.mlp = GEGLU(dim, hidden)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, probe: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = residual(x, self.attn(x, tau, probe))  # (B, N, D)
        return residual(x, self.mlp(x, tau))  # (B, N, D)


class ConvNeXtBlock(nn.Module):
    """x += depthwise conv (no norm, no activation); x += GEGLU(x). Two residuals, as released."""

    def __init__(self, dim: int, hidden: int, kernel: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.mlp = GEGLU(dim, hidden)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # The permute makes an NCHW view with channels-last strides: the fast depthwise path on CPU.
        x = residual(x, self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # (B, H, W, D)
        return residual(x, self.mlp(x, tau))  # (B, H, W, D)


def shuffle_up(x: torch.Tensor, dim_out: int) -> torch.Tensor:
    """2x upsample by channel shuffle in the release's order: out[2i+a, 2j+b, c] = x[i, j, (2a+b) D + c].

    Not torch's PixelShuffle, whose channel order is (c, a, b).
    """
    B, h, w, _ = x.shape
    x = x.view(B, h, w, 2, 2, dim_out)  # (B, h, w, a, b, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * h, 2 * w, dim_out)  # (B, 2h, 2w, D)


class SkipJoin(nn.Linear):
    """U-ViT long skip: Linear(2D -> D) of [x, skip]. The concatenation happens inside the module so
    that a compiled module fuses it with its consumers instead of materialising a float32 copy."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(torch.cat([x, skip], dim=-1))  # (B, ..., 2D) -> (B, ..., D)


class Upsampler(nn.Module):
    """Carries all features of a coarse branch to the next: TD-LN -> Linear -> 2x shuffle -> TD-LN.

    Takes the features as a list (embedding and every block output) and concatenates them itself, for
    the same reason as `SkipJoin`: compiled, the concatenation, norm and cast fuse, and the backward
    keeps the block outputs it already has rather than a wide float32 copy.
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dim_out = dim_out
        self.norm_in = TDLayerNorm(dim_in)
        self.proj = nn.Linear(dim_in, 4 * dim_out)
        self.norm_out = TDLayerNorm(dim_out)

    def forward(self, feats: list[torch.Tensor], tau: torch.Tensor) -> torch.Tensor:
        x = torch.cat(feats, dim=-1)  # (B, h, w, (n+1) D_in)
        x = self.proj(self.norm_in(x, tau))  # (B, h, w, 4 D_out)
        x = shuffle_up(x, self.dim_out)  # (B, 2h, 2w, D_out)
        return self.norm_out(x, tau)  # (B, 2h, 2w, D_out)


class ConvHead(nn.Module):
    """Per-branch output: TD-LN -> 3x3 conv to the data channels, on the branch's own grid."""

    def __init__(self, dim: int, channels: int, kernel: int) -> None:
        super().__init__()
        self.norm = TDLayerNorm(dim)
        self.conv = nn.Conv2d(dim, channels, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # The head is cheap and its output is the prediction itself: keep it in float32 under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.norm(x.float(), tau)  # (B, h, w, D)
            return self.conv(x.permute(0, 3, 1, 2))  # (B, C, h, w)
