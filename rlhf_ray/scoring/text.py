"""How a (prompt, response) pair becomes the reward model's input text: one definition for train and score."""
from __future__ import annotations


def reward_model_text(prompt: str, response: str, tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False)
    return prompt + response
