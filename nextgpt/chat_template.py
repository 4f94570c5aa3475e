"""A tokenizer's own chat template (``model.llm.template=chat``): the rendered conversation cut into the
chunks each message adds, so that :func:`nextgpt.prompts.encode_conversation` can label the assistant's."""

from __future__ import annotations

from collections.abc import Sequence


class ChatTemplateError(ValueError):
    """A tokenizer whose chat template can not carry NExT-GPT's conversations (the message says why)."""


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _messages(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for human, answer in turns:
        out.append({"role": "user", "content": human})
        if answer:
            out.append({"role": "assistant", "content": answer})
    return out


def chat_chunks(turns: Sequence[tuple[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is the assistant's) chunks: each chunk is what
    rendering one more message (with the generation prompt after a user message) adds."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template "
            "(model.llm.template=chat needs one; name a template such as vicuna_v1_1 instead)"
        )
    messages = _messages(turns)
    chunks: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        text = _render(tokenizer, messages[: i + 1], generation_prompt=msg["role"] == "user")
        if not text.startswith(done):
            raise ChatTemplateError(
                f"the chat template of {getattr(tokenizer, 'name_or_path', '?')!r} renders a "
                "conversation differently from its own beginning; NExT-GPT can not find the "
                "assistant turns in it (use a named template: model.llm.template)"
            )
        chunks.append((text[len(done) :], msg["role"] == "assistant"))
        done = text
    return chunks
