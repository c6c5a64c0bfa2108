"""Comparing two paths' greedy tokens where the paths sum in another order (kernels against the reference)."""

from __future__ import annotations

import torch

# Two paths' logits differ by another order of fp32 sums (measured ~0.005 on the bundled model's ~7-wide logits):
# a token whose reference logit is within this of the reference's choice is a tie either path may take.
TIE = 0.05


def assert_same_greedy_tokens(ref_model, prompts, ref, got):
    """Greedy tokens `got` equal the reference's `ref` for each prompt, but where a sequence parts at a tie (the
    reference's own logits of both tokens within TIE), whose continuations are other contexts and not compared;
    at most one prompt of them may part. (On a Zen 4 host the int4 model's fourth prompt parts at step 13, the
    reference's logits 6.621 / 6.613 there; on the Sapphire Rapids hosts none did.)"""
    parted = 0
    for p, r, g in zip(prompts, ref, got):
        k = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None)
        if k is None:
            assert r == g
            continue
        parted += 1
        with torch.no_grad():
            logits = ref_model(torch.tensor([list(p) + r[:k]]))[0, -1].float()
        assert logits[r[k]] - logits[g[k]] < TIE, (k, r[k], g[k], float(logits[r[k]]), float(logits[g[k]]))
    assert parted <= 1, f"{parted} of {len(prompts)} prompts parted from the reference"


# Prompts of the kind the bundled model was trained on (Python source): its answers have real margins
BUNDLED_PROMPTS = ("def read_lines(path):\n", "import os\n\n\nclass ", "for i in range(",
                   "def parse(text):\n    # split text into words, drop the empty ones and return them in lower case\n")


def assert_same_greedy_answers(ref_model, model, tok, texts=BUNDLED_PROMPTS, max_tokens: int = 24):
    """`model`'s greedy answers to `texts` (one batch_generate, max_tokens each) are `ref_model`'s, up to
    assert_same_greedy_tokens' ties."""
    import qwen35

    prompts = [tok.encode(t) for t in texts]
    params = qwen35.SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=(-1,))

    def tokens(m):
        return [[r.token for r in out] for out in qwen35.batch_generate(m, prompts, params)]

    assert_same_greedy_tokens(ref_model, prompts, tokens(ref_model), tokens(model))
