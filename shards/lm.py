"""The ``lm`` family: a small byte-level causal language model per shard (a GRU).

The vocabulary is the 256 byte values plus three specials (``BOS``, ``EOS``, ``PAD``), so
nothing in the vocabulary itself was learned from the data: erasing a record cannot leave a
token behind. A record trains as ``BOS, b_1..b_L, EOS`` (its UTF-8 bytes cut at
``block_size``) with the next-byte cross-entropy

    loss = -1/N Σ_i Σ_t log p(b_{t+1} | b_≤t),   N = number of predicted bytes (PAD ignored).

Spec: ``ModelSpec(input_dim=block_size, num_classes=VOCAB_SIZE, family="lm",
hidden=(width,)*layers, options={"embed": E})`` (see :func:`lm_spec`). A GRU rather than
a transformer: it memorises short records well at a few thousand parameters and decodes
incrementally, so CPU training and greedy probing stay cheap; on CPU it is deterministic
under ``torch.use_deterministic_algorithms``, which ``shards.training`` switches on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shards.families import Batch, ModelFamily, register_family
from shards.model import ModelSpec

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def lm_spec(block_size: int = 256, width: int = 128, layers: int = 1, embed: int = 32) -> ModelSpec:
    """The spec of a byte GRU reading at most ``block_size`` bytes per record."""
    if layers < 1 or width < 1 or embed < 1 or block_size < 1:
        raise ValueError("block_size, width, layers and embed must all be positive")
    return ModelSpec(input_dim=block_size, num_classes=VOCAB_SIZE, family="lm", hidden=(width,) * layers,
                     options={"embed": embed})


def encode_texts(texts: Sequence[str], block_size: int, *, with_eos: bool = True) -> torch.Tensor:
    """(n, block_size + 2) int64: ``BOS, bytes[:block_size], EOS`` then ``PAD``."""
    rows = torch.full((len(texts), block_size + 2), PAD, dtype=torch.int64)
    for i, text in enumerate(texts):
        data = list(text.encode("utf-8")[:block_size])
        tokens = [BOS, *data, *([EOS] if with_eos else [])]
        rows[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    return rows


class ByteGRU(nn.Module):
    """Embedding -> GRU (``layers`` x ``width``) -> next-byte logits."""

    def __init__(self, width: int, layers: int, embed: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, embed)
        self.rnn = nn.GRU(embed, width, num_layers=layers, batch_first=True)
        self.head = nn.Linear(width, VOCAB_SIZE)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, hidden = self.rnn(self.embed(tokens), hidden)
        return self.head(out), hidden

    def prime(self, prompts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the byte after each prompt (its first ``lengths[i]`` tokens) and the GRU state there."""
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(prompts), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, hidden = self.rnn(packed)
        return self.head(hidden[-1]), hidden

    def step(self, tokens: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits after feeding one more token per row."""
        logits, hidden = self.forward(tokens.unsqueeze(1), hidden)
        return logits[:, -1], hidden


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the all-PAD columns at the end of a batch (their loss is ignored anyway)."""
    longest = int((tokens != PAD).sum(dim=1).max())
    return tokens[:, : max(longest, 2)]


class LMFamily(ModelFamily):
    """Byte-level causal LM sub-models; labels and features of the shard are ignored."""

    name = "lm"
    uses_texts = True
    uses_labels = False
    kind = "generative"

    def build(self, spec: ModelSpec) -> nn.Module:
        if len(set(spec.hidden)) != 1:
            raise ValueError(f"an lm's layers share one width; got hidden={spec.hidden}, use (width,) * layers")
        return ByteGRU(spec.hidden[0], len(spec.hidden), int(spec.options.get("embed", 32)))

    def example_spec(self) -> ModelSpec:
        return lm_spec(block_size=24, width=12, layers=2, embed=6)

    def check(self, shard: Any, spec: ModelSpec) -> None:
        if spec.num_classes != VOCAB_SIZE:
            raise ValueError(f"an lm predicts {VOCAB_SIZE} byte tokens, got num_classes={spec.num_classes}; "
                             "build the spec with shards.lm.lm_spec")
        if shard.num_records and not shard.texts:
            raise ValueError(f"shard {shard.shard_id} was read without texts; read it with texts=True")

    def columns(self, shard: Any, spec: ModelSpec, device: torch.device) -> dict[str, torch.Tensor]:
        return {"tokens": encode_texts(shard.texts, spec.input_dim).to(device)}

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        tokens = _trim(batch["tokens"])
        logits, _ = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), tokens[:, 1:].reshape(-1), ignore_index=PAD)

    @torch.no_grad()
    def score(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-record mean negative log-likelihood per byte (nats)."""
        tokens = _trim(batch["tokens"])
        logits, _ = model(tokens[:, :-1])
        target = tokens[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=PAD, reduction="none")
        counted = (target != PAD).sum(dim=1).clamp(min=1)
        return nll.sum(dim=1) / counted

    def predict(self, model: nn.Module, batch: Batch):  # noqa: ANN201
        raise ValueError("the lm family generates text; use shards.generation.EnsembleLM, not predict")


LM_FAMILY = register_family(LMFamily())
