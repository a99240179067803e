"""JSONL training records in the formats Hugging Face TRL uses for SFT, one record = one
example = the unit DP protects:

- language modelling: {"text": ...}
- prompt-completion:  {"prompt": ..., "completion": ...}, each a string (plain) or a
  list of messages (conversational)
- conversational:     {"messages": [{"role": ..., "content": ...}, ...]}, rendered with
  the model's own chat template (SmolLM2's is ChatML)

A record becomes segments of text, each trained on or not: with `completion-only-loss`
(the default) the loss is taken on completions and assistant turns only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from contracts.errors import FedslmError

ROLES = ("system", "user", "assistant", "tool")
Segment = tuple[str, bool]  # (text, trained on)


class RecordError(FedslmError):
    """A record that is not one of the formats (the caller adds file and line)."""


@dataclass(frozen=True)
class Text:
    text: str

    def segments(self, tokenizer: Any) -> list[Segment]:
        return [(self.text, True)]


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str | tuple[dict[str, str], ...]
    completion: str | tuple[dict[str, str], ...]

    def segments(self, tokenizer: Any) -> list[Segment]:
        if isinstance(self.prompt, str):
            return [(self.prompt, False), (str(self.completion), True)]
        prompt = render(tokenizer, list(self.prompt), generation_prompt=True)
        full = render(tokenizer, [*self.prompt, *self.completion])
        return [(prompt, False), (_after(full, prompt), True)]


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict[str, str], ...]

    def segments(self, tokenizer: Any) -> list[Segment]:
        """Rendered a turn at a time: what each assistant turn adds is trained on."""
        out: list[Segment] = []
        done = ""
        for i, message in enumerate(self.messages):
            if message["role"] != "assistant":
                continue
            before = render(tokenizer, list(self.messages[:i]), generation_prompt=True)
            upto = render(tokenizer, list(self.messages[: i + 1]))
            out += [(_after(before, done), False), (_after(upto, before), True)]
            done = upto
        out.append((_after(render(tokenizer, list(self.messages)), done), False))
        return [s for s in out if s[0]]


Record = Text | PromptCompletion | Conversation


def parse(obj: Any) -> Record:
    """The record a decoded JSON line holds; RecordError saying what is wrong."""
    if not isinstance(obj, dict):
        raise RecordError("expected a JSON object")
    if "messages" in obj:
        return Conversation(_messages(obj["messages"], "messages", need_assistant=True))
    if "prompt" in obj or "completion" in obj:
        if "prompt" not in obj or "completion" not in obj:
            raise RecordError('a prompt-completion record needs both "prompt" and "completion"')
        prompt, completion = obj["prompt"], obj["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return PromptCompletion(prompt, completion)
        if isinstance(prompt, list) and isinstance(completion, list):
            return PromptCompletion(_messages(prompt, "prompt"),
                                    _messages(completion, "completion", need_assistant=True))
        raise RecordError('"prompt" and "completion" must both be strings or both be lists '
                          "of messages")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise RecordError('"text" must be a string')
        return Text(obj["text"])
    raise RecordError('expected "text", "prompt" and "completion", or "messages"')


def _messages(value: Any, key: str, need_assistant: bool = False) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RecordError(f'"{key}" must be a non-empty list of messages')
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RecordError(f'{key}[{i}] must be an object with a string "content"')
        if m.get("role") not in ROLES:
            raise RecordError(f"{key}[{i}] has role {m.get('role')!r}; expected one of "
                              f"{', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RecordError(f'"{key}" has no assistant message: nothing to train on')
    return tuple(out)


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise RecordError("conversational records need a chat template, and the model's "
                          "tokenizer has none")
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _after(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise RecordError("the model's chat template does not render a conversation as a "
                          "prefix of its continuation; completion-only loss cannot be placed")
    return text[len(prefix):]
