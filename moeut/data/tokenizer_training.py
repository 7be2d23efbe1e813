"""Training a corpus's SentencePiece tokenizer (SPEC 5.2): which documents and how much of them go
into tokenizer training, long documents split at paragraph, line, sentence or word boundaries into
pieces SentencePiece accepts (`split_text_bytes`, when data.tokenizer_split_paragraphs), and the
counts of what was used, skipped or mapped to <unk> (`train_corpus_tokenizer`)."""
from __future__ import annotations

import re
from typing import Iterator, List, Optional

from .sources import Corpus, read_documents
from .tokenizer import DOC_SEPARATOR, SPM_MAX_SENTENCE_BYTES, Tokenizer, train_tokenizer

MAX_PIECE_BYTES = SPM_MAX_SENTENCE_BYTES - len(DOC_SEPARATOR.encode("utf-8"))
SPLITTER_VERSION = 2  # part of the tokenizer cache name: v1 cut by characters and lost text

# Cut preferences inside the window, best first: paragraph break, line break, sentence end,
# any whitespace. Cutting after an ASCII delimiter always lands on a UTF-8 character boundary.
_CUT_PATTERNS = [re.compile(rb"\n[ \t\r\f\v]*\n"), re.compile(rb"\n"),
                 re.compile(rb"[.!?][\"')\]]*\s"), re.compile(rb"\s")]


def split_text_bytes(text: str, max_bytes: int = MAX_PIECE_BYTES) -> List[str]:
    """Cut `text` into consecutive pieces of at most `max_bytes` UTF-8 bytes each.

    Lossless: ``"".join(pieces) == text``. A cut never falls inside a multi-byte character; it
    prefers, within the last half of the allowed window, a blank line, then a line break, then a
    sentence end, then any whitespace, and only then the last character boundary. A text that
    fits is one piece. Raises ValueError when `max_bytes` < 4 (a character can take 4 bytes).
    """
    if max_bytes < 4:
        raise ValueError(f"max_bytes must be >= 4 (the longest UTF-8 character), got {max_bytes}")
    b = text.encode("utf-8")
    if len(b) <= max_bytes:
        return [text] if text else []
    pieces: List[str] = []
    pos = 0
    while len(b) - pos > max_bytes:
        end = pos + max_bytes
        cut = None
        for pat in _CUT_PATTERNS:
            last = None
            for m in pat.finditer(b, pos + max_bytes // 2, end):
                last = m
            if last is not None:
                cut = last.end()
                break
        if cut is None:  # no whitespace: the last character boundary (not a continuation byte)
            cut = end
            while cut > pos and (b[cut] & 0xC0) == 0x80:
                cut -= 1
        pieces.append(b[pos:cut].decode("utf-8"))
        pos = cut
    if pos < len(b):
        pieces.append(b[pos:].decode("utf-8"))
    return pieces


def tokenizer_sentences(corpus: Corpus, max_files: Optional[int], max_docs: Optional[int],
                        max_chars: Optional[int], split_paragraphs: bool,
                        stats: Optional[dict] = None) -> Iterator[str]:
    """Training "sentences" for SentencePiece (SPEC 5.2): each document with the separator
    appended, from the first `max_files` files, until `max_docs` documents or `max_chars`
    characters.

    `split_paragraphs` is for corpora of long documents (books) [ours]: SentencePiece skips
    sentences over 4192 bytes, which would drop every book, so a long document is cut by
    `split_text_bytes` into pieces that fit with the separator (paragraph breaks first), and
    each piece gets the separator so that "<STORY_SEP>" is as frequent as in a corpus of short
    documents (otherwise '<' falls under the character coverage and the separator becomes
    <unk>). Whitespace-only pieces carry no text and are left out. Without it, a document over
    the limit is skipped by train_tokenizer with a warning (paper parity on C4).
    `stats` (optional dict) receives files/docs/chars read and which limit stopped reading.
    """
    st = stats if stats is not None else {}
    st.update(files_available=len(corpus.files), files=0, docs=0, empty_docs=0, chars=0, stopped_by=None)
    for fi, ref in enumerate(corpus.files[:max_files]):
        st["files"] = fi + 1
        for text in read_documents(ref, corpus.text_field):
            if not text:
                st["empty_docs"] += 1
                continue
            if split_paragraphs:
                for piece in split_text_bytes(text, MAX_PIECE_BYTES):
                    if piece.strip():
                        yield piece + DOC_SEPARATOR
            else:
                yield text + DOC_SEPARATOR
            st["docs"] += 1
            st["chars"] += len(text)
            if max_docs is not None and st["docs"] >= max_docs:
                st["stopped_by"] = f"data.tokenizer_docs={max_docs}"
                return
            if max_chars is not None and st["chars"] >= max_chars:
                st["stopped_by"] = f"data.tokenizer_chars={max_chars}"
                return
    if max_files is not None and max_files < len(corpus.files):
        st["stopped_by"] = f"data.tokenizer_files={max_files}"


def train_corpus_tokenizer(corpus: Corpus, vocab_size: int = 8000, max_files: Optional[int] = None,
                           max_docs: Optional[int] = None, max_chars: Optional[int] = None,
                           split_paragraphs: bool = False, hard_vocab_limit: bool = True,
                           byte_fallback: bool = False, log=print) -> Tokenizer:
    """Train the corpus's tokenizer (SPEC 5.2; `byte_fallback` as in train_tokenizer, off in the
    paper) and log how much text it saw and what stopped it.
    Raises TokenizerTrainingError (naming the setting) when nothing is left to train on."""
    stats: dict = {}
    sentences = tokenizer_sentences(corpus, max_files, max_docs, max_chars, split_paragraphs, stats)
    where = corpus.description.get("path") or corpus.name
    tok = train_tokenizer(sentences, vocab_size=vocab_size, append_separator=False,
                          hard_vocab_limit=hard_vocab_limit, byte_fallback=byte_fallback,
                          source=f"{where} ({corpus.split})")
    if max_files is not None and max_files > len(corpus.files) and not stats["stopped_by"]:
        log(f"[data] WARNING: data.tokenizer_files={max_files} but {where} has only {len(corpus.files)} "
            f"{corpus.split} file(s): the tokenizer saw all of them")
    ts = tok.train_stats or {}
    log(f"[data] tokenizer: {ts.get('sentences', 0):,} sentences from {stats['docs']:,} documents "
        f"({stats['chars']:,} characters) of {stats['files']} of {stats['files_available']} file(s)"
        + (f"; stopped by {stats['stopped_by']}" if stats["stopped_by"] else "")
        + (f"; {stats['empty_docs']} empty documents" if stats["empty_docs"] else ""))
    tok.train_stats = {**ts, **stats}
    return tok
