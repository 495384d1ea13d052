"""An independent PyTorch reference of MTSA (Won, Chun & Serra 2019), for the parity tests.

Written from the original code's architecture, not from the Flax code: module names reproduce
the original state_dict keys exactly (`front_end.layers.3.bn`,
`back_end.encoder.layer.1.attention.self.query`, ...; the original's saved layouts are
`tests/data/*_state_dict_layout.json`), and `wrap()` adds the `module.` prefix of the original
DataParallel training. It deliberately keeps the original's behaviour (global max over the
frequency rows, erf GELU, eps 1e-12 LayerNorm, the seed-0 CLS token, sinusoidal row 0 = 0, the
table added with `expand_as`), but not its defects: any batch size works and numpy's global RNG
is left alone.

torch is a test-only dependency: nothing in `jaxtag` imports this file.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    conv_channels: int = 8
    n_mels: int = 96
    hidden_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    intermediate_size: int = 2048
    positions: str = "learned"  # "learned" (Embedding + LayerNorm + dropout) or "sinusoidal"
    attention_length: int = 271
    num_tags: int = 50
    dropout: float = 0.1  # attention and hidden dropout
    fc_dropout: float = 0.5


# visualize/vismodel.py: the released ponswon.pth.
RELEASED = ReferenceConfig()
# training/model.py with the README command, attention_length fixed to the sequence (256 + CLS).
CONV16 = ReferenceConfig(conv_channels=16, positions="sinusoidal", attention_length=257)


class VerticalBranch(nn.Module):
    """Conv2d over (frequency, time) -> BN -> ReLU -> max over all remaining frequency rows."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, (height, width), padding=(0, width // 2))
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, F, T) -> (B, c, T)
        y = F.relu(self.bn(self.conv(x)))
        # The original's MaxPool2d((96, 1)) over fewer rows: torch 1.0 pooled every row.
        return y.max(dim=2).values


class HorizontalBranch(nn.Module):
    """Conv1d over time on the frequency mean -> BN -> ReLU."""

    def __init__(self, channels: int, length: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, length, padding=length // 2)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, T) -> (B, c, T)
        return F.relu(self.bn(self.conv(x)))


class FrontEnd(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        c, tall, short = cfg.conv_channels, int(0.9 * cfg.n_mels), int(0.4 * cfg.n_mels)
        self.input_bn = nn.BatchNorm2d(1)
        self.layers = nn.ModuleList(
            [
                VerticalBranch(c, tall, 7),
                VerticalBranch(2 * c, tall, 3),
                VerticalBranch(4 * c, tall, 1),
                VerticalBranch(c, short, 7),
                VerticalBranch(2 * c, short, 3),
                VerticalBranch(4 * c, short, 1),
                HorizontalBranch(c, 165),
                HorizontalBranch(2 * c, 129),
                HorizontalBranch(4 * c, 65),
                HorizontalBranch(8 * c, 33),
            ]
        )
        self.conv1x1 = nn.Conv1d(29 * c, cfg.hidden_size, 1)
        self.bn = nn.BatchNorm1d(cfg.hidden_size)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:  # (B, F, T) -> (B, T, hidden)
        x = self.input_bn(mel.unsqueeze(1))
        mean = x.mean(dim=2)  # (B, 1, T)
        outs = [layer(x if isinstance(layer, VerticalBranch) else mean) for layer in self.layers]
        y = F.relu(self.bn(self.conv1x1(torch.cat(outs, dim=1))))
        return y.transpose(1, 2)


class Embeddings(nn.Module):
    """Learned positions (released config): add, LayerNorm(1e-12), dropout."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(cfg.attention_length, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = torch.arange(x.shape[1], device=x.device)
        return self.dropout(self.LayerNorm(x + self.position_embeddings(ids).unsqueeze(0)))


def sinusoidal_positions(length: int, width: int) -> torch.Tensor:
    """Row 0 zero; pos >= 1: sin on even, cos on odd dims of pos / 10000^(2*floor(j/2)/width)."""
    table = np.zeros((length, width), dtype=np.float64)
    for pos in range(1, length):
        for j in range(width):
            angle = pos / 10000 ** (2 * (j // 2) / width)
            table[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return torch.from_numpy(table.astype(np.float32))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_size = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H) -> (B, heads, S, d)
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_size).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = (self.split_heads(f(x)) for f in (self.query, self.key, self.value))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size)
        probs = F.softmax(scores, dim=-1)
        context = torch.matmul(self.dropout(probs), v).permute(0, 2, 1, 3).contiguous()
        return context.view(x.shape[0], x.shape[1], -1), probs


class AddNorm(nn.Module):
    """BERT's output blocks: LayerNorm(dropout(dense(h)) + residual)."""

    def __init__(self, cfg: ReferenceConfig, in_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, probs = self.self(x)
        return self.output(context, x), probs


class Intermediate(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense(x)
        return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


class Layer(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, probs = self.attention(x)
        return self.output(self.intermediate(attended), attended), probs


class Encoder(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        layer = Layer(cfg)  # deep copies of one initialised layer, as the original
        self.layer = nn.ModuleList([copy.deepcopy(layer) for _ in range(cfg.num_layers)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        attentions = []
        for layer in self.layer:
            x, probs = layer(x)
            attentions.append(probs)
        return x, attentions


class Pooler(nn.Module):
    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BackEnd(nn.Module):
    """CLS token + positions + encoder + pooler."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        if cfg.positions == "learned":
            self.embedding = Embeddings(cfg)
        else:
            self.sinusoidal = sinusoidal_positions(cfg.attention_length, cfg.hidden_size)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)
        # Not learned, not stored: np.random.seed(0); np.random.random((1, hidden)) -> float32.
        cls = np.random.RandomState(0).random((1, cfg.hidden_size)).astype(np.float32)
        self.register_buffer("cls", torch.from_numpy(cls), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        cls = self.cls.unsqueeze(0).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        if hasattr(self, "embedding"):
            x = self.embedding(x)
        else:
            x = x + self.sinusoidal.to(x.device).expand_as(x)  # length must equal the sequence
        x, attentions = self.encoder(x)
        return self.pooler(x), attentions


class MTSA(nn.Module):
    """log-mel (B, n_mels, T) -> (sigmoid tag probabilities (B, tags), attention per layer)."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.front_end = FrontEnd(cfg)
        self.back_end = BackEnd(cfg)
        self.dropout = nn.Dropout(cfg.fc_dropout)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_tags)

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pooled, attentions = self.back_end(self.front_end(mel))
        return torch.sigmoid(self.classifier(self.dropout(pooled))), attentions


def wrap(model: nn.Module) -> nn.DataParallel:
    """DataParallel, as the original training used it: state_dict keys gain `module.`.

    Kept on the CPU even where torch sees a GPU (DataParallel would move the model there and
    scatter inputs to it): the reference is the float32 CPU computation the parity tests trust.
    """
    wrapped = nn.DataParallel(model)
    wrapped.device_ids = []  # forward() then calls the module directly, on the CPU
    return wrapped.cpu()
