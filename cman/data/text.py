"""Captions: validation, and a small tokenizer trained on captions for random-init text encoders."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from cman.data.errors import DataError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def clean_caption(text: object, *, item_id: str | None = None) -> str:
    if not isinstance(text, str) or not text.strip():
        where = f" (item {item_id})" if item_id is not None else ""
        raise DataError(f"caption{where} is empty; send some text", item_id=item_id)
    return " ".join(text.split())


def train_tokenizer(captions: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on `captions`, wrapped as a RoBERTa-style fast tokenizer."""
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(list(captions), trainer=trainer)
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
