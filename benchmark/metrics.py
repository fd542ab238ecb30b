"""Scorers of LongBench and InfiniteBench, reproducing the official ones number for number.

Sources (read, not copied; the behaviour, quirks included, is what is reproduced):
- LongBench v1 `metrics.py` / `eval.py` (THUDM/LongBench), also vendored by InfLLM as `benchmark/eval.py`.
  Its `rouge_score` calls the `rouge` package (pltrdy, pinned 1.0.1 by InfLLM): ROUGE-L *summary level* over
  sentences split at ".", words split at " ", with words counted as a *set* (the package's default
  `exclusive=True`). That is not what `rouge-score` computes, so it is ported here (`_rouge_l_pltrdy`).
  Its `code_sim_score` calls fuzzywuzzy's `fuzz.ratio`, which with python-Levenshtein installed is
  `round(100 * Indel normalized similarity)`; computed here with rapidfuzz's `Indel` (the same algorithm
  python-Levenshtein >= 0.20 is built on).
- InfiniteBench `src/compute_scores.py` (OpenBMB/InfiniteBench, latest version): one scorer per task taking
  the prediction and the example's whole label. `longbook_sum_eng` is the 🤗 Evaluate `rouge` metric's
  `rougeLsum`, i.e. `rouge_score.RougeScorer(use_stemmer=False).score_multi(...)` F-measure, computed here
  with `rouge-score` directly.

Known differences from the originals, each deliberate and listed in benchmark/README.md:
- `rouge_score`: the original returns 0.0 when a sentence pair is long enough (~1000 words between two
  periods) to overflow Python's recursion limit in the package's recursive LCS backtrack; ours is iterative
  and returns the true value.
- `qa_f1_zh_score` / `rouge_zh_score` need `jieba` (not a project dependency): they raise
  MissingDependencyError without it. The 16 English LongBench tasks never call them.

Knows nothing of models, tokenizers or torch.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rapidfuzz.distance import Indel

from inf_llm.errors import MissingDependencyError

# ---------------------------------------------------------------------------------- normalization
# Chinese punctuation removed by the official normalize_zh_answer (verbatim set, ends with ASCII ".").
_CN_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
_EN_PUNCTUATION = frozenset(string.punctuation)
_ALL_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, drop ASCII punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _EN_PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Chinese normalization: lower case, drop ASCII and CJK punctuation, remove all whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ALL_PUNCTUATION)
    return "".join(s.split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba  # optional: only the Chinese LongBench tasks use it
    except ImportError:
        raise MissingDependencyError(
            "the Chinese LongBench scorers (qa_f1_zh_score, rouge_zh_score) segment words with jieba; "
            "install it with `pip install jieba==0.42.1` (the version LongBench and InfLLM pin)"
        ) from None
    return list(jieba.cut(text, cut_all=False))


# ------------------------------------------------------------------------------- LongBench metrics
# Each takes (prediction, ONE ground truth, **kwargs) like the official ones; the task score is the max over
# the example's ground truths (see `score_longbench_example`).


def f1_score(prediction: Sequence[Any], ground_truth: Sequence[Any]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when they share nothing)."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 after SQuAD normalization (English QA tasks)."""
    return f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Word F1 over jieba segments, each normalized, empty ones dropped (multifieldqa_zh)."""
    pred_tokens = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    gt_tokens = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(ground_truth)) if t]
    return f1_score(pred_tokens, gt_tokens)


def count_score(prediction: str, ground_truth: Any, **kwargs: Any) -> float:
    """Share of the integers in the prediction that equal the answer (passage_count)."""
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for n in numbers if str(n) == str(ground_truth))
    return 0.0 if not numbers else float(right / len(numbers))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    ground_truth_id = re.findall(pattern, ground_truth)[0]
    numbers = re.findall(r"\d+", prediction)
    right = sum(1 for n in numbers if str(n) == str(ground_truth_id))
    return 0.0 if not numbers else float(right / len(numbers))


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the integers in the prediction equal to the answer's paragraph number (passage_retrieval_en)."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """passage_retrieval_zh: as retrieval_score with the answer written `段落N`."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """fuzzywuzzy `ratio` / 100 between the answer and the first prediction line that is not a comment
    or a code fence (lines holding "`", "#" or "//" are skipped; none left: the empty string)."""
    candidate = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            candidate = line
            break
    return _fuzz_ratio(candidate, ground_truth) / 100


def _fuzz_ratio(s1: str, s2: str) -> int:
    """fuzzywuzzy 0.18 `fuzz.ratio` with python-Levenshtein: equal -> 100, one empty -> 0, else the
    rounded Indel similarity in percent (Python's round-half-even, as fuzzywuzzy's `intr`)."""
    if s1 == s2:
        return 100
    if not s1 or not s2:
        return 0
    return round(100 * Indel.normalized_similarity(s1, s2))


def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """trec / lsht: 1/k when the answer is among the k class names found in the prediction.

    Reproduces two quirks of the original: class names contained in the answer (but not equal to it) are
    removed while iterating over the same list, which skips the element after each removal; and the
    fallback to the most similar class never runs because it is guarded by `list != 0`, always true.
    """
    all_classes: Sequence[str] = kwargs["all_classes"]
    em_match_list = [c for c in all_classes if c in prediction]
    for match_term in em_match_list:  # mutating while iterating, as the original
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if em_match_list != 0:  # always true (a list is never 0), as in the original
        return (1.0 / len(em_match_list)) if ground_truth in em_match_list else 0.0
    best_match, highest = None, 0.0  # unreachable, as in the original
    for name in all_classes:
        similarity = difflib.SequenceMatcher(None, name, prediction).ratio()
        if similarity > highest:
            highest, best_match = similarity, name
    return float(best_match == ground_truth)


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of the `rouge` package (pltrdy, 1.0.1): `Rouge().get_scores([p], [g], avg=True)["rouge-l"]["f"]`,
    0.0 where the package raises (a side with no sentence: empty, or only periods)."""
    hyp = _pltrdy_sentences(prediction)
    ref = _pltrdy_sentences(ground_truth)
    if not hyp or not ref:
        return 0.0
    return _rouge_l_pltrdy(hyp, ref)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """rouge_score over jieba segments joined by spaces (dureader, vcsum)."""
    return rouge_score(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


def _pltrdy_sentences(text: str) -> list[str]:
    # The package splits at "." and keeps every non-empty piece, whitespace-normalized (possibly to "").
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of the LCS of x and y that the package's backtrack picks (its tie-break: step in y
    unless stepping in x keeps a strictly longer LCS). Iterative: no recursion limit."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def _rouge_l_pltrdy(hyp_sentences: list[str], ref_sentences: list[str]) -> float:
    """`rouge.rouge_score.rouge_l_summary_level(..., exclusive=True)["f"]`: union-LCS word *sets*."""
    ref_words = {w for s in ref_sentences for w in s.split(" ")}
    hyp_words = {w for s in hyp_sentences for w in s.split(" ")}
    hyp_split = [s.split(" ") for s in hyp_sentences]
    union: set[str] = set()
    llcs = 0
    for ref_s in ref_sentences:
        ref_tokens = ref_s.split(" ")
        before = len(union)
        for hyp_tokens in hyp_split:
            union |= _lcs_words(ref_tokens, hyp_tokens)
        llcs += len(union) - before
    r_lcs = llcs / len(ref_words)
    p_lcs = llcs / len(hyp_words)
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


# ---------------------------------------------------------------------------- InfiniteBench metrics
# Each takes (prediction, the example's whole label) like the official `get_score_one_*`; booleans are
# returned as 0.0 / 1.0.


def _first(label: Any) -> Any:
    return label[0] if isinstance(label, list) else label


def _first_int_match(prediction: str) -> str:
    for item in re.split("[^0-9]", prediction):
        if item != "":
            return item
    return ""


def _split_words(pred: str, chars: Iterable[str]) -> list[str]:
    for c in chars:
        pred = pred.replace(c, " ")
    return pred.split()


_RETRIEVAL_SPLIT_CHARS = ("\n", ":", '"', "'", ".", ",", "?", "!", "{", "}")


def ib_passkey_score(pred: str, label: Any, **kwargs: Any) -> float:
    """The first run of digits in the prediction equals the key."""
    return float(_first(label) == _first_int_match(pred))


def ib_number_string_score(pred: str, label: Any, **kwargs: Any) -> float:
    """As passkey: the first run of digits equals the digit string."""
    return float(_first(label) == _first_int_match(pred))


def ib_kv_retrieval_score(pred: str, label: Any, **kwargs: Any) -> float:
    """The value is one of the prediction's words (split at quotes, punctuation and braces).

    The official scorer tests `label in words` with the label as stored in its prediction files (a string);
    a one-element answer list is unwrapped here, as InfLLM's loop over answers does.
    """
    return float(_first(label) in _split_words(pred, _RETRIEVAL_SPLIT_CHARS))


def ib_code_run_score(pred: str, label: Any, **kwargs: Any) -> float:
    """The last word of the prediction, as an int, equals the return value."""
    label = _first(label)
    words = _split_words(pred.strip(), ("\n", ".", "`", "'", '"', ":"))
    if not words:
        return 0.0
    try:
        return float(label == int(words[-1]))
    except ValueError:
        return 0.0


def ib_code_debug_score(pred: str, label: Sequence[str], **kwargs: Any) -> float:
    """label = [function name, option letter]. Correct when the prediction starts with "X." / "X:", or the
    text after the first answer prefix found starts with the letter or the function name."""
    pred = pred.strip()
    fn_name, label_c = label[0], label[1]
    if pred[:2] in (f"{label_c}.", f"{label_c}:"):
        return 1.0
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:  # the prediction ends with the prefix
            return 0.0
        rest = pred[idx + len(prefix) + 1 :]
        return float(rest.startswith((label_c, fn_name)))
    return 0.0


def ib_code_debug_score_infllm(pred: str, label: Sequence[str], **kwargs: Any) -> float:
    """InfLLM's variant of the code_debug scorer (its `benchmark/infinitebench_eval.py`), which its published
    numbers used: the prefixes "answer is:", "is:", "answer:" and then "answer is", "error is"; when none is
    found, a guess seeded with the function name (`random.seed(fn_name); random.choice("ABCD")`)."""
    import random  # the original reseeds the global generator; we use a private one with the same seed

    fn_name, label_c = label[0], label[1]
    if pred[:2] in (f"{label_c}.", f"{label_c}:"):
        return 1.0
    pred = pred.strip()
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")

    def match(prefixes: tuple[str, ...], text: str) -> tuple[bool | None, str]:
        for prefix in prefixes:
            idx = text.find(prefix)
            if idx == -1:
                continue
            if len(text) < idx + len(prefix) + 1:
                return False, text
            text = text[idx + len(prefix) + 1 :]
            return text.startswith((label_c, fn_name)), text
        return None, text

    ret1, pred = match(("answer is:", "is:", "answer:"), pred)
    ret2, _ = match(("answer is", "error is"), pred)
    if ret1 is None and ret2 is None:
        return float(random.Random(fn_name).choice(["A", "B", "C", "D"]) == label_c)
    return float(bool(ret1) or bool(ret2))


def ib_math_find_score(pred: str, label: Any, **kwargs: Any) -> float:
    """The first number in the prediction equals the (int or float) answer."""
    label = _first(label)
    found = re.search(r"\d+\.\d+|\d+", pred)
    if not isinstance(label, (int, float)):
        raise TypeError(f"math_find expects an int or float answer, got {type(label).__name__}")
    if found is None:
        return 0.0
    if isinstance(label, int):
        text = found.group(0).strip()
        try:
            return float(int(text) == label)
        except ValueError:  # the original's int("1.5") raises too; a float-looking guess is wrong
            return 0.0
    return float(float(found.group(0).strip()) == label)


def ib_math_calc_score(pred: str, label: list[Any], **kwargs: Any) -> float:
    """Share of the expected intermediate values matched in order, up to the first mismatch."""
    if isinstance(label[0], list):
        label = label[0]
    pred_nums = [int(item) for item in re.split("[^0-9]", pred) if item != ""]
    cnt = 0
    for i, expected in enumerate(label):
        if i >= len(pred_nums) or expected != pred_nums[i]:
            break
        cnt += 1
    return cnt / len(label)


def ib_longdialogue_qa_eng_score(pred: str, label: Any, **kwargs: Any) -> float:
    """The (upper-case) speaker name is one of the prediction's words, upper-cased."""
    words = [w.upper() for w in _split_words(pred.strip(), _RETRIEVAL_SPLIT_CHARS)]
    return float(label[0] in words)


def ib_longbook_choice_eng_score(pred: str, label: Sequence[str], **kwargs: Any) -> float:
    """label = [option text, letter]. The first character, the whole prediction, an answer prefix, or the
    first standalone A-D word decides."""
    pred = pred.strip()
    if pred == "":
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in label)
    if pred in label:
        return 1.0
    for c in ("\n", '"', "'", ".", ",", "?", "!", "{", "}"):
        pred = pred.replace(c, " ")
    while "  " in pred:
        pred = pred.replace("  ", " ")
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = pred.find(prefix)
        if idx == -1:
            continue
        if len(pred) < idx + len(prefix) + 1:
            return 0.0
        after = pred[idx + len(prefix) + 1 :]
        return float(any(after.startswith(s) for s in label))
    for word in pred.split():
        if word in "ABCD":  # substring test, as the original ("AB" counts)
            return float(word in label)
    return 0.0


def ib_qa_f1_score(pred: str, label: Any, **kwargs: Any) -> float:
    """Max token F1 over the answers (longbook_qa_eng)."""
    answers = label if isinstance(label, list) else [label]
    return max((qa_f1_score(pred, a) for a in answers), default=0.0)


def ib_qa_f1_zh_score(pred: str, label: Any, **kwargs: Any) -> float:
    """Max character F1 over the answers after Chinese normalization (longbook_qa_chn; no jieba)."""
    answers = label if isinstance(label, list) else [label]
    return max((f1_score(list(normalize_zh_answer(pred)), list(normalize_zh_answer(a))) for a in answers), default=0.0)


def ib_rouge_lsum_score(pred: str, label: Any, **kwargs: Any) -> float:
    """🤗 Evaluate `rouge` rougeLsum F (rouge-score, no stemmer; best over several references)."""
    from rouge_score import rouge_scorer  # imported lazily: absl/nltk import cost only when summarizing

    targets = label if isinstance(label, list) else [label]
    scorer = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=False)
    return float(scorer.score_multi(targets, pred)["rougeLsum"].fmeasure)


# ------------------------------------------------------------------------------------ task tables
Metric = Callable[..., float]

# LongBench v1 (21 tasks). English-only users need the 16 of LONGBENCH_EN_TASKS.
LONGBENCH_METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# The 16 English tasks of the InfLLM paper, in its table order.
LONGBENCH_EN_TASKS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)  # fmt: skip
# Tasks whose prediction is cut to its first line before scoring (few-shot tasks), as the official eval.py.
LONGBENCH_FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

INFINITEBENCH_METRICS: dict[str, Metric] = {
    "passkey": ib_passkey_score,
    "number_string": ib_number_string_score,
    "kv_retrieval": ib_kv_retrieval_score,
    "kv_retrieval_prefix": ib_kv_retrieval_score,
    "kv_retrieval_both": ib_kv_retrieval_score,
    "code_run": ib_code_run_score,
    "code_debug": ib_code_debug_score,
    "longdialogue_qa_eng": ib_longdialogue_qa_eng_score,
    "longbook_qa_eng": ib_qa_f1_score,
    "longbook_sum_eng": ib_rouge_lsum_score,
    "longbook_choice_eng": ib_longbook_choice_eng_score,
    "longbook_qa_chn": ib_qa_f1_zh_score,
    "math_find": ib_math_find_score,
    "math_calc": ib_math_calc_score,
}
# The InfiniteBench tasks of the InfLLM paper.
INFINITEBENCH_TASKS: tuple[str, ...] = (
    "passkey", "number_string", "kv_retrieval", "longbook_choice_eng", "longbook_qa_eng",
    "longbook_sum_eng", "math_find", "code_debug",
)  # fmt: skip

# Scorer variants selectable by name (`run_eval.py score --variant code_debug=infllm`).
METRIC_VARIANTS: dict[tuple[str, str], Metric] = {("code_debug", "infllm"): ib_code_debug_score_infllm}


def benchmark_of(task: str) -> str:
    """ "longbench" or "infinitebench" for a known task name; KeyError otherwise."""
    if task in LONGBENCH_METRICS:
        return "longbench"
    if task in INFINITEBENCH_METRICS:
        return "infinitebench"
    raise KeyError(f"unknown task {task!r}; known: {sorted(LONGBENCH_METRICS) + sorted(INFINITEBENCH_METRICS)}")


# -------------------------------------------------------------------------------- task-level scores
def score_longbench_example(
    task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None
) -> float:
    """One example's score in [0, 1]: max over its answers (never below 0), first line only for few-shot tasks."""
    if task in LONGBENCH_FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = LONGBENCH_METRICS[task]
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, all_classes=all_classes))
    return score


def score_example(
    task: str, prediction: str, answers: Any, all_classes: Sequence[str] | None = None, metric: Metric | None = None
) -> float:
    """One example's score in [0, 1] with the official rule of its benchmark (`metric` overrides the scorer
    of an InfiniteBench task)."""
    if benchmark_of(task) == "longbench":
        return score_longbench_example(task, prediction, answers, all_classes)
    return float((metric or INFINITEBENCH_METRICS[task])(prediction, answers))


def score_task(task: str, records: Iterable[Mapping[str, Any]], metric: Metric | None = None) -> float | None:
    """A task's score in percent, rounded to 2 decimals as the official eval.py (None: no records).

    Each record holds "pred", "answers" and, for classification tasks, "all_classes".
    """
    scores = [score_example(task, r["pred"], r["answers"], r.get("all_classes"), metric) for r in records]
    if not scores:
        return None
    return round(100 * sum(scores) / len(scores), 2)


def longbench_averages(task_scores: Mapping[str, float]) -> dict[str, Any]:
    """The LongBench English averages: over 15 tasks (passage_count excluded, as the InfLLM paper) and over
    all 16. Each is None unless every task it covers has a score; `missing` names the absent ones."""
    tasks16 = list(LONGBENCH_EN_TASKS)
    tasks15 = [t for t in tasks16 if t != "passage_count"]
    missing = [t for t in tasks16 if t not in task_scores]

    def mean(tasks: list[str]) -> float | None:
        if any(t not in task_scores for t in tasks):
            return None
        return round(sum(task_scores[t] for t in tasks) / len(tasks), 2)

    return {"avg_15": mean(tasks15), "avg_16": mean(tasks16), "missing": missing}
