"""A joint SentencePiece subword model shared by source and target."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_sentencepiece(
    sentences: Iterable[str],
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    user_symbols: Sequence[str] = (),
) -> bytes:
    """Train a SentencePiece model on ``sentences`` and return the serialized model;
    ``user_symbols`` (e.g. target-language tags) become pieces of their own, never split."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,
        user_defined_symbols=list(user_symbols),
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


class Tokenizer:
    """Encode raw text to subword ids and decode ids back to detokenized text."""

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.pad_id, self.unk_id = PAD_ID, UNK_ID
        self.bos_id, self.eos_id = BOS_ID, EOS_ID

    def __reduce__(self) -> tuple[type[Tokenizer], tuple[bytes]]:
        """Pickled as its model's bytes (a SentencePiece processor itself is not picklable):
        decoding worker processes get the tokenizer so."""
        return (Tokenizer, (self.model_bytes,))

    @property
    def vocab_size(self) -> int:
        """Number of subword types, special tokens included."""
        return self.sp.get_piece_size()

    def encode(self, sentences: list[str]) -> list[list[int]]:
        """Raw sentences -> subword ids (no BOS/EOS)."""
        return self.sp.encode(sentences)

    def encode_pieces(self, sentence: str) -> list[str]:
        """A raw sentence -> its subword strings."""
        return self.sp.encode(sentence, out_type=str)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Subword ids -> detokenized sentences; special tokens are dropped."""
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self.sp.decode([[i for i in seq if i not in specials] for seq in ids])

    def piece_id(self, piece: str) -> int | None:
        """The id of a whole piece (a language tag, say), or None if it is not one."""
        i = self.sp.piece_to_id(piece)
        return None if i == self.unk_id and piece != self.sp.id_to_piece(i) else i

    def id_to_pieces(self, ids: list[int]) -> list[str]:
        """Subword ids -> their piece strings (for labels, e.g. attention maps)."""
        return [self.sp.id_to_piece(i) for i in ids]
