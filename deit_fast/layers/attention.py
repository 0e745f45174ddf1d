"""Attention modules with timm's parameter names, running on deit_fast.ops.

q, k, v go to the ops as strided views of the projections (no .contiguous() copies): the kernels
read any strides. forward_attn_map() is the explicit unfused path: plain torch math that returns
the attention probabilities (the fused ops never materialise them), for visualisation or rollout.
Attention dropout is not fused; with attn_drop > 0 in training the unfused math runs instead.
"""
from torch import Tensor, nn

from deit_fast import ops
from deit_fast.ops.attention import split_qkv


class _HeadsMixin:
    """Shared head bookkeeping: timm's attributes (num_heads, head_dim, scale)."""

    def _init_heads(self, dim: int, num_heads: int) -> None:
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5

    def _merge(self, o: Tensor) -> Tensor:
        """(B, H, N, D) -> (B, N, H*D), then the output projection."""
        B, _, N, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, -1)))

    def _dropout_path(self) -> bool:
        # A Python bool fixed per module mode: no data-dependent branch for torch.compile.
        return self.training and self.attn_drop.p > 0


class Attention(_HeadsMixin, nn.Module):
    """Multi-head self-attention (DeiT/ViT): qkv Linear, softmax(q k^T * scale) v, proj."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self._init_heads(dim, num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _packed(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)

    def _qkv(self, x: Tensor):
        return split_qkv(self._packed(x))  # three (B, H, N, D) views of one buffer

    def _probs(self, q: Tensor, k: Tensor) -> Tensor:
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        if self._dropout_path():
            q, k, v = self._qkv(x)
            return self._merge(self.attn_drop(self._probs(q, k)) @ v)
        # Packed: the projection's grad comes back as one tensor, no stack and reshape copies.
        return self._merge(ops.attention_qkv(self._packed(x), self.scale))

    def forward_attn_map(self, x: Tensor) -> Tensor:
        """Attention probabilities (B, H, N, N) for input x (B, N, C), unfused."""
        q, k, _ = self._qkv(x)
        return self._probs(q, k)


class TalkingHeadAttn(Attention):
    """CaiT self-attention: logits mixed across heads by proj_l before the softmax, probabilities
    mixed by proj_w after it (both (H, H) Linears with bias). forward_attn_map returns the mixed
    probabilities, the matrices that multiply v (their rows need not sum to 1)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        # Registered after proj, as timm does, so state_dict key order matches too.
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    def _probs(self, q: Tensor, k: Tensor) -> Tensor:
        # A Linear over the head axis: move heads last, mix, move back.
        mix = lambda lin, s: lin(s.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # noqa: E731
        return mix(self.proj_w, mix(self.proj_l, (q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        if self._dropout_path():
            q, k, v = self._qkv(x)
            return self._merge(self.attn_drop(self._probs(q, k)) @ v)
        return self._merge(ops.talking_heads_attention_qkv(
            self._packed(x), self.proj_l.weight, self.proj_l.bias, self.proj_w.weight, self.proj_w.bias,
            self.scale))


class ClassAttn(_HeadsMixin, nn.Module):
    """CaiT class-attention: only token 0 (cls) queries; keys and values come from all tokens.
    Returns the updated class token, (B, 1, C)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self._init_heads(dim, num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _probs(self, x: Tensor) -> Tensor:
        q, k = self._heads(self.q(x[:, :1])), self._heads(self.k(x))
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        v = self._heads(self.v(x))
        if self._dropout_path():
            return self._merge(self.attn_drop(self._probs(x)) @ v)
        q, k = self._heads(self.q(x[:, :1])), self._heads(self.k(x))
        return self._merge(ops.class_attention(q, k, v, self.scale))

    def forward_attn_map(self, x: Tensor) -> Tensor:
        """Class-token attention probabilities (B, H, 1, N) for input x (B, N, C), unfused."""
        return self._probs(x)
