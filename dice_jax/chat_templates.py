"""Named chat templates for the paper's settings (docs/method.md), as Jinja strings.

A config's `model.chat_template` is None (the tokenizer's own template), one of these
names, or a Jinja template string. The two paper templates reproduce the official code's
prompts exactly: Zephyr's with an empty system turn and no BOS, Llama-3's header format
with no system prompt.
"""

from __future__ import annotations

from typing import Any

TEMPLATES = {
    # <|system|>\n </s>\n<|user|>\n{x}</s>\n<|assistant|>\n   (no BOS)
    "zephyr": (
        "{{ '<|system|>\\n </s>\\n' }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '</s>\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '<|assistant|>\\n' + message['content'] + '</s>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{x}<|eot_id|>...
    "llama3_no_system": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}{% if message['role'] != 'system' %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str | None) -> str | None:
    """A template name or Jinja string -> Jinja string (None stays None)."""
    if value is None:
        return None
    if value in TEMPLATES:
        return TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value
    raise ValueError(f"unknown chat template {value!r}: use one of {sorted(TEMPLATES)} "
                     "or a Jinja template string")


def apply_chat_template(tokenizer: Any, template: str | None = None) -> Any:
    """Sets the tokenizer's chat template to a named or literal one (None: keep its own)."""
    resolved = resolve_chat_template(template)
    if resolved is not None:
        tokenizer.chat_template = resolved
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; set model.chat_template")
    return tokenizer
