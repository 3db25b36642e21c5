"""Ensemble generation from the ``lm`` sub-models: average the members' next-byte distributions.

At each step the ensemble's distribution is the mixture

    p(b | prefix) = 1/S · Σ_s p_s(b | prefix)

and greedy decoding takes its argmax. Why the mixture (not a product or a vote): it is the
ensemble's own likelihood, so its perplexity is comparable with a single model's, it never
lets one member veto a byte, and it keeps each member's influence bounded by 1/S.

What that means for a record seen by only one member (SISA places each record in one shard):
its influence on the ensemble is diluted by 1/S, not removed. Under the mixture each of its
bytes keeps at least 1/S of the probability that member s gives it, so its likelihood drops by
at most ``log S`` nats per byte; whether greedy decoding still reproduces it depends on what
the other S-1 members predict there (a member confident about its own data can outvote it,
or not). Only retraining member s without the record removes it (``shards.retrain``); the
extraction probe (``shards.extraction``) measures what remains either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from shards.lm import BOS, EOS, PAD, VOCAB_SIZE, encode_texts

_NEVER = torch.tensor([BOS, PAD])  # bytes a continuation never contains


class EnsembleLM:
    """Members that are ``ByteGRU`` sub-models (one per shard), decoded as one mixture model."""

    def __init__(self, members: Sequence[nn.Module], block_size: int) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member; train the shards first")
        self.members = [m.eval() for m in members]
        self.block_size = block_size
        self.device = next(self.members[0].parameters()).device

    @classmethod
    def from_checkpoints(cls, store, checkpoints: Sequence,  # noqa: ANN001
                         device: str | torch.device = "cpu") -> EnsembleLM:
        from shards.training import load_submodel

        loaded = [load_submodel(store, c, device) for c in checkpoints]
        families = {cfg.model.family for _, cfg in loaded}
        if families != {"lm"}:
            raise ValueError(f"members are of family {sorted(families)}; generation needs lm sub-models")
        return cls([m for m, _ in loaded], loaded[0][1].model.input_dim)

    @torch.no_grad()
    def continue_greedily(self, prompts: Sequence[str], max_new_bytes: int, stop_after_words: int | None = None,
                          ) -> list[str]:
        """The greedy continuation of each prompt: at most ``max_new_bytes`` bytes, stopping at EOS or, with
        ``stop_after_words``, once that many whitespace-separated words are complete."""
        if not prompts:
            return []
        prompt_tokens = encode_texts(prompts, self.block_size, with_eos=False).to(self.device)
        lengths = (prompt_tokens != PAD).sum(dim=1).cpu()
        primed = [m.prime(prompt_tokens[:, : int(lengths.max())], lengths) for m in self.members]
        hiddens = [h for _, h in primed]
        logits = [lg for lg, _ in primed]
        out: list[list[int]] = [[] for _ in prompts]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(max_new_bytes):
            probs = torch.stack([F.softmax(lg, dim=1) for lg in logits]).mean(dim=0)
            probs[:, _NEVER] = -1.0
            nxt = probs.argmax(dim=1)
            chosen = nxt.tolist()
            for i in torch.nonzero(~done).flatten().tolist():
                token = chosen[i]
                if token == EOS:
                    done[i] = True
                    continue
                out[i].append(token)
                if stop_after_words is not None and _words_complete(out[i], stop_after_words):
                    done[i] = True
            if bool(done.all()):
                break
            stepped = [m.step(nxt, h) for m, h in zip(self.members, hiddens)]
            logits = [lg for lg, _ in stepped]
            hiddens = [h for _, h in stepped]
        return [_decode(tokens, stop_after_words) for tokens in out]

    @torch.no_grad()
    def byte_nll(self, texts: Sequence[str], batch_size: int = 64) -> tuple[float, int]:
        """(total negative log-likelihood in nats, bytes predicted) of ``texts`` under the mixture."""
        total, count = 0.0, 0
        for begin in range(0, len(texts), batch_size):
            tokens = encode_texts(texts[begin : begin + batch_size], self.block_size).to(self.device)
            longest = int((tokens != PAD).sum(dim=1).max())
            tokens = tokens[:, :longest]
            target = tokens[:, 1:]
            probs = torch.stack([F.softmax(m(tokens[:, :-1])[0], dim=2) for m in self.members]).mean(dim=0)
            picked = probs.gather(2, target.clamp(max=VOCAB_SIZE - 1).unsqueeze(2)).squeeze(2)
            mask = target != PAD
            total += float(-torch.log(picked[mask].clamp(min=1e-12)).sum())
            count += int(mask.sum())
        return total, count

    def perplexity(self, texts: Sequence[str]) -> float:
        """``exp(NLL / bytes)``: per-byte perplexity of the mixture on ``texts``."""
        total, count = self.byte_nll(texts)
        return float(torch.exp(torch.tensor(total / max(count, 1))))


def _decode(tokens: list[int], words: int | None) -> str:
    text = bytes(tokens).decode("utf-8", errors="replace")
    return " ".join(text.split()[:words]) if words is not None else text


def _words_complete(tokens: list[int], words: int) -> bool:
    text = bytes(tokens).decode("utf-8", errors="replace")
    parts = text.split()
    return len(parts) > words or (len(parts) == words and text[-1:].isspace())
