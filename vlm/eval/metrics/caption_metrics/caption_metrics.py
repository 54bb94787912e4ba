"""COCO caption metrics (CIDEr-D, BLEU-1..4, METEOR, ROUGE-L) as a local `evaluate` module.

The numbers come from pycocoevalcap, the scorer behind published COCO caption results, so they are
comparable with papers only when the text is tokenised the same way: with the Stanford PTB tokenizer
(Java), which lower-cases, splits clitics ("it's" -> "it 's") and drops punctuation. Without Java we fall
back to `simple_ptb_tokenize`, a pure-Python imitation, skip METEOR (its scorer is Java too) and say so.

Load it with `evaluate.load("<path to this folder>")`, or simply call `vlm.eval.scoring.score_captions`.
"""

import re
import shutil
import warnings

import datasets
import evaluate
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

_DESCRIPTION = """\
Corpus-level COCO caption metrics from pycocoevalcap: CIDEr-D (the `Cider` scorer: clipped n-gram TF-IDF
cosine with a length penalty, IDF taken from the references of all items), BLEU-1..4 (closest reference
length), METEOR 1.5 and ROUGE-L. Any number of references per item.
"""

_INPUTS = """\
Args:
    predictions: one generated caption per item.
    references: the human captions of each item (at least one per item).
    tokenizer: "auto" (PTB if Java is installed, else simple), "ptb" (fail without Java) or "simple".
    include_meteor: METEOR starts a Java process that loads a paraphrase table (10-25 s); pass False to
        skip it, e.g. for frequent validation during training.
Returns:
    {"cider", "bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l"} as floats, plus "tokenizer"
    ("ptb" or "simple"). "meteor" is absent when skipped or when Java is missing.
"""

_CITATION = """\
@inproceedings{vedantam2015cider, title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi}, booktitle={CVPR}, year={2015}}
@article{chen2015microsoft, title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and others}, journal={arXiv:1504.00325}, year={2015}}
"""

TOKENIZER_CHOICES = ("auto", "ptb", "simple")

# Tokens that pycocoevalcap deletes after PTB tokenisation. PTB turns double quotes into `` and '', so a
# raw '"' is listed too.
_PTB_DROPPED_TOKENS = {"''", "'", '"', "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# Tokens PTB rewrites. Brackets become -LRB- etc.; because PTB also lower-cases, pycocoevalcap's
# upper-case "-LRB-" filter misses them and they survive as "-lrb-". A few words are split in two.
_PTB_REWRITTEN_TOKENS = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
    "cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
}  # fmt: skip
# PTB reads typographic punctuation as its ASCII equivalent ("it’s" -> "it 's", "—" -> "--").
_TYPOGRAPHIC_TO_ASCII = str.maketrans(
    {"‘": "'", "’": "'", "“": '"', "”": '"', "–": "--", "—": "--", "…": "..."}
)
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"""(?:[a-z]\.){2,}            # acronyms keep their dots: "u.s."
      | n't | '(?:s|re|ve|ll|d|m)\b  # clitics, already separated from their word
      | \w+(?:[-/.,:]\w+)*          # words, with inner hyphens/slashes, and numbers like 3.5 or 1,000
      | \.\.\. | -- | '' | `` | [!?]{2,}  # multi-character punctuation ("!!" is kept, as PTB does)
      | \S                          # any other symbol on its own
    """,
    re.VERBOSE,
)


def simple_ptb_tokenize(text: str) -> str:
    """Tokenise like pycocoevalcap's PTB step, without Java; return space-joined lower-case tokens.

    Matches PTB on ordinary captions (punctuation dropped, "aren't" -> "are n't", "dog's" -> "dog 's",
    "black-and-white" and "3.5" kept whole, "(" -> "-lrb-"). Known differences, all rare in captions:
    abbreviations such as "dr." lose their dot, "y'all" loses its apostrophe, and symbols glued to a
    word ("@home") are split off.
    """
    text = _CLITIC.sub(r" \1", text.lower().translate(_TYPOGRAPHIC_TO_ASCII))
    tokens = [token for token in _TOKEN.findall(text) if token not in _PTB_DROPPED_TOKENS]
    return " ".join(_PTB_REWRITTEN_TOKENS.get(token, token) for token in tokens)


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """Tokenise all texts in one Java call (the JVM start dominates, so one call for everything)."""
    # PTB runs line by line: any line break inside a text would shift every later text by one line.
    one_line_texts = {index: [{"caption": " ".join(text.split())}] for index, text in enumerate(texts)}
    tokenized = PTBTokenizer().tokenize(one_line_texts)
    if len(tokenized) != len(texts):
        raise RuntimeError(
            f"caption_metrics: the Java PTB tokenizer returned {len(tokenized)} lines for {len(texts)} "
            "texts; check that `java -version` works, or pass tokenizer='simple'."
        )
    return [tokenized[index][0] for index in range(len(texts))]


def _meteor_score(references: dict[int, list[str]], predictions: dict[int, list[str]]) -> float:
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(references, predictions)
    finally:
        # Meteor.__del__ (which stops the Java process) waits for this lock, and a failed
        # compute_score leaves it held: release it so a crash cannot turn into a hang.
        if meteor.lock.locked():
            meteor.lock.release()
    return float(score)


def _resolve_tokenizer(tokenizer: str) -> str:
    if tokenizer not in TOKENIZER_CHOICES:
        raise ValueError(f"caption_metrics: tokenizer={tokenizer!r}; choose one of {TOKENIZER_CHOICES}.")
    java_found = shutil.which("java") is not None
    if tokenizer == "ptb" and not java_found:
        raise RuntimeError(
            "caption_metrics: tokenizer='ptb' needs Java, but `java` is not on PATH. Install a JRE "
            "(e.g. apt-get install default-jre-headless) or pass tokenizer='simple'."
        )
    if tokenizer == "simple" or not java_found:
        reason = "tokenizer='simple' was requested" if tokenizer == "simple" else "`java` is not on PATH"
        warnings.warn(
            f"caption_metrics: {reason}, so captions are tokenised by a pure-Python imitation of the PTB "
            "tokenizer (rare differences, e.g. abbreviations) and METEOR, which needs Java, is omitted. "
            "Scores are close to, but not exactly, the published COCO protocol.",
        )
        return "simple"
    return "ptb"


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if not predictions:
        raise ValueError("caption_metrics: predictions is empty; pass at least one caption.")
    for index, refs in enumerate(references):
        if not refs:
            raise ValueError(f"caption_metrics: references[{index}] is empty; every item needs a reference.")
    if len(predictions) == 1:
        warnings.warn(
            "caption_metrics: a single item was scored. CIDEr-D takes IDF from the references of all "
            "items, so with one item every n-gram has IDF 0 and CIDEr is 0. Score a whole split.",
        )


class CaptionMetrics(evaluate.Metric):
    """COCO caption metrics over a corpus of (prediction, references) pairs."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[list[str]],
        tokenizer: str = "auto",
        include_meteor: bool = True,
    ) -> dict[str, float | str]:
        _check_inputs(predictions, references)
        tokenizer_used = _resolve_tokenizer(tokenizer)

        # Tokenise predictions and references together, then cut the flat list back per item.
        flat_texts = list(predictions) + [ref for refs in references for ref in refs]
        if tokenizer_used == "ptb":
            flat_tokens = _ptb_tokenize(flat_texts)
        else:
            flat_tokens = [simple_ptb_tokenize(text) for text in flat_texts]
        tokenized_predictions = {index: [flat_tokens[index]] for index in range(len(predictions))}
        tokenized_references: dict[int, list[str]] = {}
        start = len(predictions)
        for index, refs in enumerate(references):
            tokenized_references[index] = flat_tokens[start : start + len(refs)]
            start += len(refs)

        cider, _ = Cider().compute_score(tokenized_references, tokenized_predictions)
        # verbose=0 keeps Bleu from printing its n-gram counts to stdout.
        bleu, _ = Bleu(4).compute_score(tokenized_references, tokenized_predictions, verbose=0)
        rouge_l, _ = Rouge().compute_score(tokenized_references, tokenized_predictions)
        results: dict[str, float | str] = {"cider": float(cider)}
        results.update({f"bleu_{n}": float(score) for n, score in enumerate(bleu, start=1)})
        if include_meteor and tokenizer_used == "ptb":
            results["meteor"] = _meteor_score(tokenized_references, tokenized_predictions)
        results["rouge_l"] = float(rouge_l)
        results["tokenizer"] = tokenizer_used
        return results
