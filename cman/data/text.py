"""Captions: validation, and a small tokenizer trained on captions for random-init text encoders."""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cman.data.errors import DataError, LimitError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_DROPPED = {"Cc", "Cf", "Cs", "Co", "Cn"}  # control, format (zero-width, bidi), surrogate, private use, unassigned


def normalize_text(text: str) -> str:
    """NFKC-normalised text with control/format/unassigned/surrogate characters dropped and whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text)
    kept = (" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROPPED)
    return " ".join("".join(kept).split())


RAW_FACTOR = 4  # raw text may be this many times `max_chars` before normalisation (which drops and collapses)


def clean_caption(text: object, *, item_id: str | None = None, max_chars: int | None = None) -> str:
    """`normalize_text(text)`; empty (e.g. only NUL or control characters) → DataError, too long → LimitError.

    With `max_chars`, text over `RAW_FACTOR * max_chars` characters is refused before it is normalised: NFKC can
    expand one character 18x (U+FDFA), so normalising a 1 MiB field first would cost seconds of CPU."""
    where = f" (item {item_id})" if item_id is not None else ""
    if max_chars is not None and isinstance(text, str) and len(text) > RAW_FACTOR * max_chars:
        raise LimitError(
            f"text{where} is {len(text):,} characters, over the {max_chars:,}-character limit (max_text_chars)",
            item_id=item_id,
        )
    cleaned = normalize_text(text) if isinstance(text, str) else ""
    if not cleaned:
        raise DataError(
            f"caption{where} is empty after removing control characters and whitespace; send some text",
            item_id=item_id,
        )
    if max_chars is not None and len(cleaned) > max_chars:
        raise LimitError(
            f"text{where} is {len(cleaned):,} characters, over the {max_chars:,}-character limit (max_text_chars)",
            item_id=item_id,
        )
    return cleaned


def train_tokenizer(captions: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer for `captions`, wrapped as a RoBERTa-style fast tokenizer.

    Vocabulary: special tokens, every character (word-initial and `##` continuation, so any word can be spelled),
    then whole words by frequency (ties alphabetical), cut at `vocab_size`. Built directly rather than with
    `WordPieceTrainer`, whose merges among equally frequent pairs differ from call to call, so that the same
    captions and seed give the same model.
    """
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word
        for caption in captions
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(caption))
    )
    chars = sorted({ch for word in words for ch in word})
    ranked = [w for w, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1]
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{ch}" for ch in chars), *ranked]))[:vocab_size]
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>")
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )
