"""Reference computations from outside our code, shared by the test suites."""

from __future__ import annotations

import torch


def hf_greedy(model, prompt: list[int], num_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation by an HF transformers model, recomputing the whole sequence each step
    (no HF KV cache, so nothing is shared with our paged cache). Returns the new token ids and each
    step's float32 log-softmax over the vocabulary."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    steps = []
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(ids).logits[0, -1].float()
            steps.append(torch.log_softmax(logits, -1))
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist(), steps
