"""A PyTorch U-ViT written from the paper's architecture with the module names of the official
`libs/uvit.py` and NCHW inputs.

It is the test-side reference for shapes the golden files do not cover (conv=False with head dim
72, qkv_bias, skip=False, deep text-to-image with the time MLP). `test_uvit.py` first checks that
it reproduces the official golden outputs, so agreeing with it means agreeing with the release.
"""

import math

import torch
from torch import nn


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // h) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, skip):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(
        self,
        img_size,
        patch_size,
        in_chans,
        embed_dim,
        depth,
        num_heads,
        mlp_ratio=4.0,
        qkv_bias=False,
        mlp_time_embed=False,
        num_classes=-1,
        conv=True,
        skip=True,
        clip_dim=None,
        num_clip_token=None,
    ):
        super().__init__()
        self.p, self.c = patch_size, in_chans
        self.text = clip_dim is not None
        n = (img_size // patch_size) ** 2
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.time_embed = (
            nn.Sequential(
                nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim)
            )
            if mlp_time_embed
            else nn.Identity()
        )
        if self.text:
            self.context_embed = nn.Linear(clip_dim, embed_dim)
            self.extras = 1 + num_clip_token
        else:
            self.label_emb = nn.Embedding(num_classes, embed_dim) if num_classes > 0 else None
            self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + n, embed_dim))
        self.in_blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, False) for _ in range(depth // 2)]
        )
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, False)
        self.out_blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, skip) for _ in range(depth // 2)]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size**2 * in_chans)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

    def forward(self, x, t, y=None, context=None):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        tok = [self.time_embed(timestep_embedding(t, d)).unsqueeze(1)]
        if self.text:
            tok.append(self.context_embed(context))
        elif self.label_emb is not None:
            tok.insert(0, self.label_emb(y).unsqueeze(1))
        x = torch.cat([*tok, x], dim=1) + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras :]
        side = int(math.isqrt(n))
        x = x.reshape(b, side, side, self.p, self.p, self.c)
        x = torch.einsum("nhwpqc->nchpwq", x).reshape(b, self.c, side * self.p, side * self.p)
        return self.final_layer(x)


def random_state_dict(model: nn.Module, seed: int) -> dict:
    """Every parameter perturbed, so zero biases and unit gains cannot hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
