"""Chat templates for GGUF files that carry none.

The Gemma 3 GGUF used here has no ``tokenizer.chat_template``. The template
below renders Gemma's documented turn format: ``<start_of_turn>ROLE\\n...
<end_of_turn>\\n`` with the assistant role called ``model``, a leading BOS, and
a system message folded into the first user turn. Message content may be a
string or a list of ``{"type": "text", "text": ...}`` parts.
"""

from __future__ import annotations

GEMMA_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content | trim }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = text(messages[0]['content']) + '\\n\\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set prefix = '' -%}"
    "{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if loop.first -%}{{ prefix }}{%- endif -%}"
    "{{ text(message['content']) }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

#: Templates by the name used in :attr:`ModelSpec.fallback_chat_template`.
CHAT_TEMPLATES: dict[str, str] = {"gemma": GEMMA_CHAT_TEMPLATE}
