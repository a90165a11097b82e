"""Captions: validation, and a small tokenizer trained on captions for random-init text encoders."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cman.data.errors import DataError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def clean_caption(text: object, *, item_id: str | None = None) -> str:
    if not isinstance(text, str) or not text.strip():
        where = f" (item {item_id})" if item_id is not None else ""
        raise DataError(f"caption{where} is empty; send some text", item_id=item_id)
    return " ".join(text.split())


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
