"""Language models whose log-probabilities are known exactly, for testing scorers.

They follow the package's model interface (`model(ids[B, T]).logits -> [B, T, V]`), so the same
engine that scores MoEUT scores them, and a test can compute every expected score by hand.
"""
from __future__ import annotations

import torch
from torch import nn

from moeut.outputs import LMOutput


class _Fake(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self._dev = nn.Parameter(torch.zeros(()), requires_grad=False)  # so .to(device) works

    def _out(self, logits_BTV: torch.Tensor) -> LMOutput:
        return LMOutput(logits=logits_BTV, reg_loss=torch.zeros((), device=logits_BTV.device))


class UnigramLM(_Fake):
    """Context-free: logits at every position are the same vector `logits_V`, so
    log P(tok_p | tok_<p) = log_softmax(logits_V)[tok_p]. All zeros = the uniform model."""

    def __init__(self, logits_V: torch.Tensor):
        super().__init__(logits_V.numel())
        self.register_buffer("logits_V", logits_V.float().clone())

    def forward(self, input_ids, **kw) -> LMOutput:
        B, T = input_ids.shape
        return self._out(self.logits_V.expand(B, T, -1).clone())


class BigramLM(_Fake):
    """logits at position p are row `table_VV[tok_p]`: log P(tok_p | tok_<p) =
    log_softmax(table_VV[tok_{p-1}])[tok_p]."""

    def __init__(self, table_VV: torch.Tensor):
        super().__init__(table_VV.shape[0])
        self.register_buffer("table_VV", table_VV.float().clone())

    def forward(self, input_ids, **kw) -> LMOutput:
        return self._out(self.table_VV[input_ids])


class PeekingLM(_Fake):
    """Cheats: the logits at position p put `margin` on the *actual* next input token, so every
    argmax prediction is right, except at the positions in `wrong_at` (counted from the start of
    the sequence), where `wrong_id` gets the margin instead."""

    def __init__(self, vocab_size: int, margin: float = 10.0, wrong_at=(), wrong_id: int = 0):
        super().__init__(vocab_size)
        self.margin = margin
        self.wrong_at = set(wrong_at)
        self.wrong_id = wrong_id

    def forward(self, input_ids, **kw) -> LMOutput:
        B, T = input_ids.shape
        nxt_BT = torch.roll(input_ids, -1, dims=1)
        for p in self.wrong_at:
            if p < T:
                nxt_BT[:, p] = self.wrong_id
        logits = torch.zeros(B, T, self.vocab_size, device=input_ids.device)
        logits.scatter_(-1, nxt_BT[..., None], self.margin)
        return self._out(logits)


class PositionLM(_Fake):
    """logits at input position p are p + 1 on token 0 and 0 elsewhere, whatever the tokens: so
    log P(token 1 at position p + 1) = -log(e^(p + 1) + V - 1) reveals how many tokens of context
    (p + 1) the scorer gave it."""

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size)

    def forward(self, input_ids, **kw) -> LMOutput:
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab_size, device=input_ids.device)
        logits[:, :, 0] = torch.arange(1, T + 1, dtype=torch.float32, device=input_ids.device)
        return self._out(logits)


WORDS = ("the cat dog sat on a mat and ran to house big small red blue tree under over river "
         "boat sun moon star we they you it was is are be have had not but or if when then there "
         "green old new man woman child walked quickly slowly into from with without near far").split()


def generated_texts(n: int = 400, seed: int = 0):
    """Plain sentences from a fixed word list: enough text to train a small SentencePiece model
    in a test without any downloaded corpus."""
    import random
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(rnd.randrange(5, 15))).capitalize() + "."
            for _ in range(n)]


def make_tiny_run(root, vocab_size: int = 128, step: int = 50, preset: str = "tiny"):
    """A run dir with one checkpoint of a freshly initialised preset and a tokenizer trained on
    generated_texts(); returns (run_dir, model, tokenizer)."""
    from pathlib import Path
    from moeut.checkpoint import save_checkpoint
    from moeut.registry import build_model, get_preset
    from moeut.data.tokenizer import train_tokenizer
    tok = train_tokenizer(generated_texts(), vocab_size=vocab_size)
    torch.manual_seed(0)
    cfg = get_preset(preset, vocab_size=tok.vocab_size)
    model = build_model(cfg).eval()
    run = Path(root) / "run"
    save_checkpoint(run / "checkpoints", step, model, cfg, tokenizer=tok)
    return run, model, tok
