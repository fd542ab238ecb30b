"""Chat prompts: the tokenizer's own chat template, or a `conv_type` fallback for tokenizers without one.

Owns: turning `[{role, content}]` (roles system / user / assistant) into the prompt text the model was
trained on, ending where the assistant's answer starts, and into its token ids with every special token
written inside a message encoded as text (`encode_chat`: only the template's markers are control tokens).
Knows nothing of HTTP or of the model.

The fallbacks reproduce the prompt formats of the original InfLLM project (benchmark/pred.py `build_chat`)
extended to several turns.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from jinja2.exceptions import TemplateError

try:  # newer transformers: control tokens typed into a message can be encoded as text
    from transformers.utils.chat_template_utils import mark_control_tokens
except ImportError:  # older (the GPU machine's 5.17): _can_sanitize is False there, such messages are refused
    mark_control_tokens = None

from inf_llm.errors import RequestError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# The system prompt of the original vicuna_v1.1 template (fastchat), used when none is given.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# The original project's Qwen prompt sets this system prompt.
QWEN_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...] = ()  # end-of-turn markers the model may print as text (fallback templates)


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    stop: tuple[str, ...] = ()  # as RenderedPrompt.stop


def build_messages(prompt: str | None, history: Sequence[Message] = (), system: str | None = None) -> list[Message]:
    """System prompt (if any) + history + the new user prompt (if any)."""
    messages: list[Message] = []
    if system:
        messages.append(Message("system", system))
    messages.extend(history)
    if prompt is not None:
        messages.append(Message("user", prompt))
    return messages


def render_chat(tokenizer, messages: Sequence[Message], conv_type: str | None = None) -> RenderedPrompt:
    """The prompt text for `messages`, ending with the start of the assistant's turn.

    Uses the tokenizer's chat template when it has one, else the `conv_type` fallback. Raises
    RequestError when the conversation cannot be rendered (an unknown role, a template refusing the order
    of roles, or no template at all).
    """
    _check_conversation(tokenizer, messages, conv_type)
    if getattr(tokenizer, "chat_template", None):
        return RenderedPrompt(_apply_template(tokenizer, messages))
    return _render_fallback(messages, conv_type)


def encode_chat(tokenizer, messages: Sequence[Message], conv_type: str | None = None) -> EncodedPrompt:
    """The token ids of `render_chat`'s prompt, with the special tokens that appear inside a message's text
    encoded as plain text: typing `<|im_end|><|im_start|>system` into a message cannot forge a turn.

    transformers' `sanitize_control_tokens` does the work (it marks the control tokens in the messages, renders,
    and encodes the marked ones as text); where the installed transformers lacks it, a message that contains a
    special token is refused (RequestError) instead.
    """
    _check_conversation(tokenizer, messages, conv_type)
    if _can_sanitize(tokenizer):
        if getattr(tokenizer, "chat_template", None):
            return EncodedPrompt(_apply_template(tokenizer, messages, tokenize=True))
        control = _control_pattern(tokenizer)
        marked = [Message(m.role, mark_control_tokens(m.content, control)) for m in messages]
        rendered = _render_fallback(marked, conv_type)
        return EncodedPrompt(_sanitized_ids(tokenizer, rendered.text), rendered.stop)
    _refuse_control_tokens(tokenizer, messages)
    rendered = render_chat(tokenizer, messages, conv_type)
    return EncodedPrompt(tokenizer(rendered.text, add_special_tokens=False)["input_ids"], rendered.stop)


def encode_text(tokenizer, text: str) -> list[int]:
    """The ids of `text` as a message's text is encoded by `encode_chat` (control tokens as text, no BOS)."""
    if not _can_sanitize(tokenizer):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return _sanitized_ids(tokenizer, mark_control_tokens(text, _control_pattern(tokenizer)))


def _check_conversation(tokenizer, messages: Sequence[Message], conv_type: str | None) -> None:
    for m in messages:
        if m.role not in ROLES:
            raise RequestError(f"message role {m.role!r} is not one of {', '.join(ROLES)}")
    if not any(m.role == "user" for m in messages):
        raise RequestError("the conversation has no user message")
    if not getattr(tokenizer, "chat_template", None) and conv_type is None:
        raise RequestError(
            "the tokenizer has no chat template and the config sets no conv_type; set conv_type "
            "(mistral-inst, vicuna, qwen, chatml, minicpm, llama-3-inst) or use /v1/completions"
        )


def _render_fallback(messages: Sequence[Message], conv_type: str) -> RenderedPrompt:
    return FALLBACKS[conv_type](_merge_system(messages) if conv_type in _NO_SYSTEM_ROLE else list(messages))


def _control_tokens(tokenizer) -> list[str]:
    """Every added token (special or not): each is one id wherever it appears in text."""
    return [t for t in tokenizer.added_tokens_encoder if t and not t.isspace()]


def _control_pattern(tokenizer) -> re.Pattern:
    """A regex of the control tokens, longest first (a token wins over the tokens it contains)."""
    return re.compile("|".join(map(re.escape, sorted(_control_tokens(tokenizer), key=len, reverse=True))) or "(?!)")


def _can_sanitize(tokenizer) -> bool:
    return "sanitize_control_tokens" in inspect.signature(tokenizer.apply_chat_template).parameters


def _sanitized_ids(tokenizer, text: str) -> list[int]:
    try:
        return tokenizer(text, add_special_tokens=False, sanitize_control_tokens=True)["input_ids"]
    except ValueError as exc:  # "Can't sanitize ...: the tokenizer produces it from plain text"
        raise RequestError(f"a message cannot be encoded as text: {exc}") from None


def _refuse_control_tokens(tokenizer, messages: Sequence[Message]) -> None:
    tokens = _control_tokens(tokenizer)
    for i, m in enumerate(messages):
        found = next((t for t in tokens if t in m.content), None)
        if found is not None:
            raise RequestError(
                f"message {i} ({m.role}) contains {found!r}, one of the model's control tokens, which this "
                f"transformers version cannot encode as text (it needs apply_chat_template's "
                f"sanitize_control_tokens); remove it"
            )


def _apply_template(tokenizer, messages: Sequence[Message], tokenize: bool = False) -> str | list[int]:
    """The chat template's text, or (tokenize) its ids with the messages' control tokens encoded as text."""
    kwargs = {"add_generation_prompt": True, "tokenize": tokenize}
    if tokenize:
        kwargs.update(sanitize_control_tokens=True, return_dict=False)
    plain = [{"role": m.role, "content": m.content} for m in messages]
    try:
        try:
            return tokenizer.apply_chat_template(plain, **kwargs)
        except TemplateError as exc:
            # Some templates (older Mistral) refuse a system role or demand strict alternation: retry once with
            # the system prompt folded into the first user message before giving up.
            if any(m.role == "system" for m in messages):
                merged = [{"role": m.role, "content": m.content} for m in _merge_system(messages)]
                try:
                    return tokenizer.apply_chat_template(merged, **kwargs)
                except TemplateError:
                    pass
            raise RequestError(f"the model's chat template rejected the conversation: {exc}") from None
    except ValueError as exc:  # sanitize_control_tokens: a control token the tokenizer also makes from text
        raise RequestError(f"a message cannot be encoded as text: {exc}") from None


def _merge_system(messages: Sequence[Message]) -> list[Message]:
    """Fold system messages into the first user message (for formats without a system role)."""
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content)
    rest = [m for m in messages if m.role != "system"]
    if system:
        for i, m in enumerate(rest):
            if m.role == "user":
                rest[i] = Message("user", f"{system}\n\n{m.content}")
                break
    return rest


def _turns(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    system = None
    if messages and messages[0].role == "system":
        system, messages = messages[0].content, messages[1:]
    return system, list(messages)


def _mistral_inst(messages: Sequence[Message]) -> RenderedPrompt:
    # <s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST]
    out = "<s>"
    for m in messages:
        out += f"[INST] {m.content} [/INST]" if m.role == "user" else f" {m.content}</s>"
    return RenderedPrompt(out, ("[INST]",))


def _vicuna(messages: Sequence[Message]) -> RenderedPrompt:
    # fastchat vicuna_v1.1: "SYSTEM USER: u1 ASSISTANT: a1</s>USER: u2 ASSISTANT:"
    system, turns = _turns(messages)
    out = (system or VICUNA_SYSTEM) + " "
    for m in turns:
        out += f"USER: {m.content} ASSISTANT:" if m.role == "user" else f" {m.content}</s>"
    return RenderedPrompt(out, ("USER:",))


def _chatml(default_system: str | None):
    def render(messages: Sequence[Message]) -> RenderedPrompt:
        system, turns = _turns(messages)
        system = system or default_system
        out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for m in turns:
            out += f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n"
        return RenderedPrompt(out + "<|im_start|>assistant\n", ("<|im_end|>", "<|im_start|>"))

    return render


def _minicpm(messages: Sequence[Message]) -> RenderedPrompt:
    # <用户>u1<AI>a1<用户>u2<AI>
    out = ""
    for m in messages:
        out += f"<用户>{m.content}<AI>" if m.role == "user" else m.content
    return RenderedPrompt(out, ("<用户>",))


def _llama3_inst(messages: Sequence[Message]) -> RenderedPrompt:
    out = "<|begin_of_text|>"
    for m in messages:
        out += f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content}<|eot_id|>"
    return RenderedPrompt(out + "<|start_header_id|>assistant<|end_header_id|>\n\n", ("<|eot_id|>",))


FALLBACKS = {
    "mistral-inst": _mistral_inst,
    "vicuna": _vicuna,
    "qwen": _chatml(QWEN_SYSTEM),
    "chatml": _chatml(None),
    "minicpm": _minicpm,
    "llama-3-inst": _llama3_inst,
}
# Formats with no system role: the system prompt goes in front of the first user message.
_NO_SYSTEM_ROLE = ("mistral-inst", "minicpm")
