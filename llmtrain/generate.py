"""`llmtrain generate`: sample text from a checkpoint (temperature, top-k)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from llmtrain.model import Decoder


@torch.no_grad()
def sample(model: Decoder, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
           top_k: Optional[int] = 50, eos_id: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> list[int]:
    """Autoregressive sampling; recomputes the whole window each step (no KV cache: fine for small models)."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    for _ in range(max_new_tokens):
        window = ids[:, -model.config.max_seq_len:]
        logits = model(window)[:, -1, :].float()  # (1, V)
        if temperature <= 0:
            next_id = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id], dim=1)
        if eos_id is not None and next_id.item() == eos_id:
            break
    return ids[0, len(prompt_ids):].tolist()


def _tokenizer_dir(checkpoint: dict, explicit: Optional[str]) -> str:
    if explicit:
        return explicit
    path = checkpoint.get("llmtrain", {}).get("tokenizer")
    if not path:
        raise SystemExit("error: this checkpoint does not record its tokenizer; pass --tokenizer DIR")
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain generate", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="a checkpoint: .ckpt file, ZeRO or universal folder")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder; default: the one the run used")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=50, help="0 = no top-k filter")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.ckpt).exists():
        parser.error(f"--ckpt {args.ckpt}: no such file or folder")
    if args.max_new_tokens < 1 or args.top_k < 0:
        parser.error("--max_new_tokens must be >= 1 and --top_k >= 0")

    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.checkpointing.readers import load_decoder

    model, checkpoint = load_decoder(args.ckpt)
    tokenizer = load_tokenizer(_tokenizer_dir(checkpoint, args.tokenizer))
    # Training packs documents as `tokens EOS` (BOS only with data.add_bos): EOS is what precedes a document.
    prompt_ids = [tokenizer.eos_id] + tokenizer.encode(args.prompt)
    generator = torch.Generator().manual_seed(args.seed)
    new_ids = sample(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k or None,
                     tokenizer.eos_id, generator)
    print(args.prompt + tokenizer.decode(new_ids))
    return 0
