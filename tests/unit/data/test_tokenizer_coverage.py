"""Text that becomes <unk>: the default job's tokenizer (byte fallback) maps no text to <unk> and
decodes it back; the paper configs keep SentencePiece's defaults (SPEC 5.2); training any tokenizer
warns, with a count, about characters of its own training text that map to <unk>; the setting is
part of the tokenizer and token cache keys, and a resumed run keeps its own tokenizer."""
import io
import os
import random
import sys
import unicodedata
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))

from test_configs import compose_cfg  # noqa: E402
from moeut.data.pipeline import data_corpus, find_tokenizer, obtain_tokenizer, tokenizer_cache_path  # noqa: E402
from moeut.data.prepare import token_cache_dir  # noqa: E402
from moeut.data.tokenizer import DOC_SEPARATOR, Tokenizer, train_tokenizer  # noqa: E402
from moeut.train_lib.config import to_typed  # noqa: E402

# Text a prompt, a heading or a generation may hold; NFKC-stable and single-spaced, so that
# SentencePiece's default normalisation (kept: SPEC 5.2) leaves it unchanged and decoding gives it back.
EDGE = ["Question: Z = 1", "= = Heading = =", "Q&A: x^2 + y_1 = {z} | [w] ~ `v` @ #5 $3 %",
        "naïve café Øresund Ærø straße", "Привет, мир", "日本語のテキスト 中文 한국어", "emoji 😀🚀🧪 and ☃ ✓ ∑ ∞",
        "<pad> <unk> <s> </s> " + DOC_SEPARATOR, "tab\tand newline", "\U0001F9EC \u0915\u094D\u0937"]
QUIET = lambda *a, **k: None  # noqa: E731


def _default_job_data(tmp_path, *overrides):
    """The default job's data config (data=books) with a small tokenizer budget and a private cache."""
    return to_typed(compose_cfg([f"data.cache_dir={tmp_path}", "data.tokenizer_chars=400000", *overrides])).data


def test_default_job_tokenizer_maps_no_text_to_unk(tmp_path):
    d = _default_job_data(tmp_path)
    assert d.tokenizer_byte_fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no character of the training text maps to <unk>
        tok = obtain_tokenizer(d, log=QUIET)
    assert tok.train_stats is None or tok.train_stats["unk_chars"] == 0
    unk = tok.sp.unk_id()
    rng = random.Random(0)
    # arbitrary code points (letters, symbols, CJK, emoji planes), kept where NFKC leaves them alone
    pool = [chr(c) for c in list(range(0x21, 0x7F)) + list(range(0xA1, 0x2FF)) + list(range(0x370, 0x52F))
            + list(range(0x4E00, 0x4E00 + 400)) + list(range(0x1F300, 0x1F3FF))]
    pool = [c for c in pool if unicodedata.normalize("NFKC", c) == c and unicodedata.category(c)[0] in "LNPS"]
    arbitrary = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(200)]
    for text in EDGE + arbitrary:
        ids = tok.encode(text)
        assert unk not in ids, (text, [tok.id_to_piece(i) for i in ids])
        want = text.replace("\t", " ").replace("\n", " ")  # SentencePiece's normalisation of whitespace
        assert tok.decode(ids) == want
    assert [tok.id_to_piece(i) for i in tok.encode("Question:")][:2] == ["▁", "<0x51>"]  # Q as its byte


def test_paper_settings_are_unchanged_and_warn_with_the_count(tmp_path):
    """data=c4 (a paper config) trains with SentencePiece's defaults: the very model a direct trainer
    call with SPEC 5.2's options gives; on the books, its <unk> characters are warned about."""
    d = to_typed(compose_cfg(["data=c4"])).data
    assert d.tokenizer_byte_fallback is False and d.tokenizer_split_paragraphs is False
    docs = [f"document {i} about things and more things" for i in range(300)]
    ours = train_tokenizer(docs, vocab_size=120, hard_vocab_limit=False)
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([t + DOC_SEPARATOR for t in docs]), model_writer=buf,
                                   vocab_size=120, model_type="bpe", split_digits=True, hard_vocab_limit=False,
                                   minloglevel=2)
    assert ours.model_proto == buf.getvalue()
    # the default job's corpus with the paper's settings: `Q`, `=` become <unk>, and training said so
    paper_books = _default_job_data(tmp_path, "data.tokenizer_byte_fallback=false")
    with pytest.warns(UserWarning, match=r"[\d,]+ characters of the training text \(\d+ distinct.*map to <unk>.*"
                                         r"data.tokenizer_byte_fallback=true"):
        tok = obtain_tokenizer(paper_books, log=QUIET)
    assert tok.train_stats["unk_chars"] > 0
    assert tok.sp.unk_id() in tok.encode("Question: Z = 1")


def test_unk_warning_counts_the_training_characters():
    """A constructed corpus: 2000 sentences of common letters plus exactly 3 `Q` and 2 `☃`, far
    below SentencePiece's character coverage (0.9995): the warning says 5 characters, 2 distinct."""
    rng = random.Random(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "home", "to", "its", "bed"]
    docs = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(2000)]
    docs[5] += " Q"
    docs[77] += " Q the Q"
    docs[300] += " ☃ and ☃"
    n_text = sum(len(t) + len(DOC_SEPARATOR) for t in docs)
    assert 5 / n_text < 0.0005  # both are under the coverage, so the trained model has no piece for them
    with pytest.warns(UserWarning, match=r"5 characters of the training text \(2 distinct; most frequent: 'Q' x3, "
                                         r"'☃' x2\) map to <unk>"):
        tok = train_tokenizer(docs, vocab_size=100, hard_vocab_limit=False)
    assert (tok.train_stats["unk_chars"], tok.train_stats["unk_distinct"]) == (5, 2)
    # independent check of the count: encode the training text and count the <unk> ids (each rare
    # character stands alone between known ones here)
    assert sum(tok.encode(t + DOC_SEPARATOR).count(tok.sp.unk_id()) for t in docs) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # byte fallback: nothing maps to <unk>, nothing to warn about
        fb = train_tokenizer(docs, vocab_size=300, hard_vocab_limit=False, byte_fallback=True)
    assert fb.train_stats["unk_chars"] == 0 and fb.sp.unk_id() not in fb.encode("Quick ☃ Z=1")


def test_setting_is_part_of_the_caches_and_resume_keeps_the_runs_tokenizer(tmp_path):
    """Byte fallback changes the tokenizer cache path (paper caches keep their old names), hence the
    tokenizer hash and the token cache; a run dir that holds an older tokenizer keeps using it."""
    on = _default_job_data(tmp_path)
    off = _default_job_data(tmp_path, "data.tokenizer_byte_fallback=false")
    p_on, p_off = tokenizer_cache_path(on), tokenizer_cache_path(off)
    assert p_on != p_off and p_on.endswith("-bf.model") and not p_off.endswith("-bf.model")
    with pytest.warns(UserWarning, match="map to <unk>"):
        old = obtain_tokenizer(off, log=QUIET)
    new = obtain_tokenizer(on, log=QUIET)
    assert old.sha256 != new.sha256
    corpus = data_corpus(on, "train")
    assert token_cache_dir(on.cache_dir, corpus, old) != token_cache_dir(on.cache_dir, corpus, new)
    # a run started before the change: its run dir's tokenizer.model wins over the new setting
    run = tmp_path / "run"
    old.save(run / "tokenizer.model")
    tok, where = find_tokenizer(on, str(run))
    assert tok.sha256 == old.sha256 and where == os.path.join(str(run), "tokenizer.model")
    from moeut.train_lib.data import resolve_tokenizer
    from moeut.train_lib.distributed import DistInfo
    assert resolve_tokenizer(on, str(run), DistInfo(), log=QUIET).sha256 == old.sha256
    assert Tokenizer.load(run / "tokenizer.model").sp.unk_id() in old.encode("Question")
