"""Model definitions of the benchmark problems (written for this suite, no torchvision needed).

* :class:`SmallCNN`: two conv-ReLU-maxpool stages and a two-layer classifier head.
* :class:`ResNet`: residual networks of basic blocks (small, for CPU) or bottleneck blocks
  (ResNet-50). He, K., Zhang, X., Ren, S., Sun, J. (2016). Deep residual learning for image
  recognition.
* :class:`GPT`: a decoder-only transformer with pre-LayerNorm blocks whose attention calls
  ``torch.nn.functional.scaled_dot_product_attention`` (causal). Radford, A., Wu, J., Child, R.,
  Luan, D., Amodei, D., Sutskever, I. (2019). Language models are unsupervised multitask
  learners. Returns the logits flattened to ``[batch * context, vocab]``.

All models are deterministic in ``eval()`` mode (BatchNorm uses its running statistics).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def mlp(sizes: list[int]) -> nn.Sequential:
    """A ReLU MLP with the given layer widths (``sizes[0]`` inputs, ``sizes[-1]`` outputs)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SmallCNN(nn.Sequential):
    """``conv(c, w) - ReLU - pool - conv(w, 2w) - ReLU - pool - linear - ReLU - linear``."""

    def __init__(self, in_channels: int, width: int, image_size: int, hidden: int, classes: int):
        side = image_size // 4
        super().__init__(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1-projection shortcut."""

    expansion = 1

    def __init__(self, c_in: int, c_mid: int, stride: int):
        super().__init__()
        c_out = c_mid * self.expansion
        self.conv1 = nn.Conv2d(c_in, c_mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 - 3x3 (strided) - 1x1 convolutions with BatchNorm, expansion 4 (ResNet-50)."""

    expansion = 4

    def __init__(self, c_in: int, c_mid: int, stride: int):
        super().__init__()
        c_out = c_mid * self.expansion
        self.conv1 = nn.Conv2d(c_in, c_mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_mid)
        self.conv2 = nn.Conv2d(c_mid, c_mid, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_mid)
        self.conv3 = nn.Conv2d(c_mid, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = _shortcut(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
    )


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pooling, linear classifier.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        blocks_per_stage: Number of blocks in each stage (stage ``i`` has ``widths[i]``
            channels before expansion and stride 2 except the first).
        widths: Channel widths of the stages.
        classes: Number of classes.
        imagenet_stem: 7x7 stride-2 convolution and max-pooling (ResNet-50) instead of a 3x3
            convolution (small images).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: list[int],
        widths: list[int],
        classes: int,
        *,
        imagenet_stem: bool = False,
    ):
        super().__init__()
        c = widths[0]
        if imagenet_stem:
            self.stem = nn.Sequential(
                nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
            )
        stages = []
        c_in = c
        for i, (n, w) in enumerate(zip(blocks_per_stage, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(block(c_in, w, stride))
                c_in = w * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def resnet50(classes: int = 1000) -> ResNet:
    """ResNet-50 (He et al., 2016): bottleneck stages ``[3, 4, 6, 3]``, about 25.6 M params."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], classes, imagenet_stem=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (GELU, width 4x)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only transformer (GPT-2 layout, untied output layer) returning flat logits.

    Args:
        vocab: Vocabulary size.
        context: Maximum sequence length (learned position embeddings).
        dim: Embedding width.
        heads: Attention heads per block.
        layers: Number of blocks.
    """

    def __init__(self, vocab: int, context: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        T = idx.shape[1]
        positions = self.pos.weight[:T]
        h = self.blocks(self.tok(idx) + positions)
        logits = self.lm_head(self.ln_f(h))
        return logits.reshape(-1, logits.shape[-1])
