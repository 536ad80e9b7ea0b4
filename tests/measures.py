"""What the tests measure on trained models, in the test process: completion log-probs, the DPO margin,
KL to a teacher, greedy generation. Prompts go through the tokenizer's chat template, as in training."""

from __future__ import annotations

import torch


def load_causal(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def chat_prompt(tok, query: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True)


def encode_pair(tok, query: str, answer: str) -> tuple[list[int], list[int]]:
    """Prompt ids (chat template, generation prompt) and completion ids (answer + eos)."""
    prompt = tok(chat_prompt(tok, query), add_special_tokens=False)["input_ids"]
    completion = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt, completion


@torch.no_grad()
def completion_logits(model, tok, pairs, chunk: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (query, answer): the logits at the positions that predict the completion tokens (answer +
    eos) after the chat-templated prompt, and those tokens. Batched, right-padded."""
    out = []
    for start in range(0, len(pairs), chunk):
        encoded = [encode_pair(tok, q, a) for q, a in pairs[start : start + chunk]]
        width = max(len(p) + len(c) for p, c in encoded)
        ids = torch.full((len(encoded), width), tok.pad_token_id)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (p, c) in enumerate(encoded):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for i, (p, c) in enumerate(encoded):
            out.append((logits[i, len(p) - 1 : len(p) + len(c) - 1], torch.tensor(c)))
    return out


def completion_logps(model, tok, pairs) -> list[float]:
    """Summed log-probability of each completion (answer + eos) given its chat prompt."""
    return [
        torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item()
        for logits, target in completion_logits(model, tok, pairs)
    ]


def mean_answer_nll(model, tok, rows) -> float:
    """Mean per-token negative log-likelihood of the expected answers (+ eos)."""
    scored = completion_logits(model, tok, [(r["input_query"], r["expected_answer"]) for r in rows])
    total = sum(-torch.log_softmax(lg, -1).gather(-1, t[:, None]).sum().item() for lg, t in scored)
    return total / sum(len(t) for _, t in scored)


def dpo_margin(model, tok, pairs) -> float:
    """Mean over pairs of log p(chosen + eos | prompt) - log p(rejected + eos | prompt)."""
    chosen = completion_logps(model, tok, [(p["prompt"], p["chosen"]) for p in pairs])
    rejected = completion_logps(model, tok, [(p["prompt"], p["rejected"]) for p in pairs])
    return sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)


def mean_token_kl(student, teacher, tok, sequences) -> float:
    """Mean over completion tokens of KL(teacher || student) at temperature 1."""
    total, n = 0.0, 0
    for (s_logits, _), (t_logits, _) in zip(completion_logits(student, tok, sequences),
                                            completion_logits(teacher, tok, sequences)):
        s, t = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
        total += (t.exp() * (t - s)).sum().item()
        n += s.shape[0]
    return total / n


@torch.no_grad()
def generate(model, tok, query: str, max_new_tokens: int = 8) -> tuple[int, str]:
    """Greedy generation from a chat prompt: (number of new tokens, decoded text)."""
    enc = tok(chat_prompt(tok, query), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, enc["input_ids"].shape[1] :]
    return len(new), tok.decode(new, skip_special_tokens=True)


@torch.no_grad()
def last_logits(model, tok, query: str) -> torch.Tensor:
    enc = tok(chat_prompt(tok, query), return_tensors="pt", add_special_tokens=False)
    return model(**enc).logits[0, -1].float()
