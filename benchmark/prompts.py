"""Prompt construction of the original InfLLM benchmark code (thunlp/InfLLM `benchmark/pred.py`,
`benchmark/config/dataset2prompt.json`, `dataset2maxlen.json`): templates, generation lengths, which tasks get
a chat template, special tokens, stop tokens, truncation and post-processing.

The templates and generation lengths are copied from InfLLM, which takes them from LongBench (THUDM/LongBench)
and InfiniteBench (OpenBMB/InfiniteBench): all three MIT-licensed; their copyright lines and licence text are in
THIRD_PARTY_NOTICES.md.

Owns text -> token ids for one benchmark example. Knows nothing of the model or of torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from inf_llm.errors import ConfigError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------- templates
# The original's dataset2prompt.json, verbatim (typos included: they are part of the published numbers).
# MIT-licensed (InfLLM, LongBench, InfiniteBench): see THIRD_PARTY_NOTICES.md.
DATASET2PROMPT: dict[str, str] = {
    # LongBench (LongBench's own prompts)
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "2wikimqa": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "musique": "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
    # InfiniteBench (InfLLM's adaptation of InfiniteBench's GPT-4 prompts)
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there.\n\n{context}\n\n{input}",
    "number_string": "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the important information there.\n\n{context}\n\n{input}",
    "kv_retrieval": "Extract the value corresponding to the specified key {key} in the JSON object below.\n\n{context}\n\n{input}",
    "longbook_qa_eng": "Read the book below and answer a question.\n\n{context}\n\nQuestion: {question}\n\nPlease answer as short as possible. The answer is:",
    "longbook_choice_eng": "Read the book and answer the question.\n\n{context}\n\nQuestion: {question}\n\nOnly one of the following options is correct, tell me the answer using one single letter (A, B, C, or D). Don't say anything else.\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}",
    "longbook_sum_eng": "Summarize the following book.\n\n{context}",
    "longbook_qa_chn": "请根据以下书籍回答我的问题。\n\n{context}\n\n问题：{question}\n请尽量简短地回答。",
    "math_find": "{prefix}\n\n{context}\n\n{input}",
    "math_calc": "Compute the intermediate values in the following long expression.\n\n{context}",
    "code_run": "Following is a set of Python functions. There is a function called named {func}.\n\n{context}\n\nPlease give me the exact number of the return value of {func_call}. Be concise. Your response must end with the final returned value.",
    "code_debug": "There is ONLY ONE function in the large project that is deliberately made to include an obvious error. Please find the function that contains the most obvious errors. I will give you four options to narrow your scope. You can inspect the options and think. Eventually, tell me the answer using one single letter (A, B, C, or D).\n\n{context}\n\nWhich funtion has deliberate error?\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}\n\nGive me your answer for the function that has the deliberate and obvious error in A, B, C, or D. Your answer MUST be chosen from one of the four options without any explanation. If you cannot determine answers accurately, you also MUST provide the answer you think is most likely. Absolutely do not say you do not know or you need more information.",
    "longdialogue_qa_eng": "Below is a dialogue script where one random occurrence of a character name is replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\nThe dialogue:\n\n---\n\n{context}\n\n---\n\nEnd of dialogue.\n\nWhich character is most likely \"$$MASK$$\"? Just say the name used by the scriptwriter (before the colon marks) of one single character and nothing else.",
}  # fmt: skip

# The original's dataset2maxlen.json: new tokens generated per task (MIT: THIRD_PARTY_NOTICES.md).
DATASET2MAXGEN: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
    "passkey": 32, "number_string": 32, "kv_retrieval": 100, "longbook_qa_eng": 32, "longbook_choice_eng": 32,
    "longbook_sum_eng": 1536, "longbook_qa_chn": 32, "math_find": 32, "math_calc": 64000, "code_run": 32,
    "code_debug": 32, "longdialogue_qa_eng": 32,
}  # fmt: skip

# Tasks fed as raw text even to chat models ("chat models are better off without build prompts on these").
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
# Prompt tokens always kept from the head when truncating (the original's `init_token_num`).
TRUNCATION_HEAD_TOKENS = 128
# fastchat's "vicuna_v1.1" conversation (system prompt, roles, separators), which the original imported
# (FastChat: Apache-2.0, THIRD_PARTY_NOTICES.md).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TokenizerLike(Protocol):
    """The slice of a transformers tokenizer used here."""

    eos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any: ...
    def convert_tokens_to_ids(self, token: str) -> Any: ...


class TruncationStyle(str, Enum):
    INFLLM = "infllm"  # keep the first 128 tokens and the tail (the original InfLLM pred.py)
    MIDDLE = "middle"  # keep the first and last halves (LongBench's and InfiniteBench's own pred.py)


def format_prompt(task: str, fields: Mapping[str, Any]) -> str:
    """The task's template filled with the example's fields (KeyError names a missing field)."""
    if task not in DATASET2PROMPT:
        raise ConfigError(f"no prompt template for task {task!r}; known: {sorted(DATASET2PROMPT)}")
    return DATASET2PROMPT[task].format(**fields)


def uses_chat_template(task: str) -> bool:
    return task not in NO_CHAT_TASKS


def build_chat(tokenizer: TokenizerLike, prompt: str, conv_type: str | None) -> str:
    """Wrap a prompt as one user turn of the model's chat format (the original `build_chat`).

    `vicuna`: fastchat's vicuna_v1.1 text. `mistral-inst`, `qwen`, `minicpm`, `llama-3-inst`: the tokenizer's
    chat template. Our extensions `chatml` and None: the tokenizer's chat template when it has one, else the
    bare prompt.
    """
    if conv_type == "vicuna":
        return f"{VICUNA_SYSTEM} USER: {prompt} ASSISTANT:"
    messages = [{"role": "user", "content": prompt}]
    if conv_type in ("mistral-inst", "qwen", "minicpm", "llama-3-inst"):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if conv_type in ("chatml", None):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        log.info("tokenizer has no chat template and conv_type is %r: prompts are used as raw text", conv_type)
        return prompt
    raise ConfigError(
        f"conv_type {conv_type!r} has no benchmark chat format; use one of mistral-inst, vicuna, qwen, minicpm, "
        f"llama-3-inst, chatml"
    )


def add_special_tokens_for(task: str, conv_type: str | None, chat_applied: bool) -> bool:
    """Whether the tokenizer adds its special tokens (BOS) to the prompt. The original: not for mistral-inst
    chat prompts (its template already starts with <s>), yes otherwise. For our `chatml`/None: not when a chat
    template was applied (the template writes whatever the model needs)."""
    if not uses_chat_template(task):
        return True
    if conv_type == "mistral-inst":
        return False
    return not (conv_type in ("chatml", None) and chat_applied)


def _encode(tokenizer: TokenizerLike, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt ready for the model."""

    ids: list[int]  # token ids after truncation
    original_tokens: int  # token count before truncation
    truncated: bool
    skipped: bool  # over-long with truncation "error": the original skips such examples


def encode_prompt(
    tokenizer: TokenizerLike,
    task: str,
    fields: Mapping[str, Any],
    conv_type: str | None,
    max_len: int,
    max_gen: int,
    truncation: str = "suffix",
    style: TruncationStyle = TruncationStyle.INFLLM,
) -> EncodedPrompt:
    """Template -> chat format -> ids, truncated so that prompt + `max_gen` fits `max_len` (the original rule:
    the limit is `max_len - max_gen`; decode the kept ids and re-tokenize, as the original does).

    `truncation`: "suffix" truncates; "error" marks over-long prompts skipped (the original without
    `truncation` in its config). `style` picks which tokens are kept.
    """
    prompt = format_prompt(task, fields)
    chat = uses_chat_template(task)
    if chat:
        wrapped = build_chat(tokenizer, prompt, conv_type)
        chat_applied = wrapped != prompt
        prompt = wrapped
    else:
        chat_applied = False
    special = add_special_tokens_for(task, conv_type, chat_applied)
    ids = _encode(tokenizer, prompt, special)
    limit = max_len - max_gen
    if len(ids) <= limit:
        return EncodedPrompt(ids, len(ids), truncated=False, skipped=False)
    if truncation == "error":
        return EncodedPrompt(ids, len(ids), truncated=False, skipped=True)
    if limit <= TRUNCATION_HEAD_TOKENS:
        raise ConfigError(
            f"max_len ({max_len}) minus the generation length of {task} ({max_gen}) leaves {limit} prompt tokens, "
            f"not more than the {TRUNCATION_HEAD_TOKENS} kept from the head; raise max_len"
        )
    kept = truncate_ids(ids, limit, style)
    text = tokenizer.decode(kept)
    return EncodedPrompt(_encode(tokenizer, text, special), len(ids), truncated=True, skipped=False)


def truncate_ids(ids: Sequence[int], limit: int, style: TruncationStyle = TruncationStyle.INFLLM) -> list[int]:
    """Keep at most `limit` ids: the first 128 and the last `limit - 128` (InfLLM), or the first and the last
    `limit // 2` (LongBench's pred.py)."""
    if len(ids) <= limit:
        return list(ids)
    if style is TruncationStyle.INFLLM:
        return list(ids[:TRUNCATION_HEAD_TOKENS]) + list(ids[-(limit - TRUNCATION_HEAD_TOKENS) :])
    half = limit // 2  # LongBench: int(max_length / 2) from both ends
    return list(ids[:half]) + list(ids[-half:])


def stop_token_ids(tokenizer: TokenizerLike, task: str, conv_type: str | None, extra: Sequence[int] = ()) -> list[int]:
    """Token ids that end generation: EOS, the chat format's end-of-turn token, "\\n" for samsum."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if conv_type == "llama-3-inst":
        ids.append(_encode(tokenizer, "<|eot_id|>", False)[0])
    if conv_type in ("qwen", "chatml"):
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end >= 0 and im_end != getattr(tokenizer, "unk_token_id", None):
            ids.append(im_end)
    if task == "samsum":
        ids.append(_encode(tokenizer, "\n", False)[-1])
    ids.extend(int(i) for i in extra)
    return list(dict.fromkeys(ids))


def post_process(pred: str, conv_type: str | None, task: str) -> str:
    """The original's post-processing of a decoded prediction."""
    if conv_type in ("qwen", "chatml"):
        pred = pred.split("<|im_end|>")[0]
    if task == "samsum":
        pred = pred.split("\n")[0].strip()
    return pred
