"""Tests for jaxlstm.data: reading, cleaning, vocabulary and batching.

Batching tests run on the stream np.arange(N), where every id is its own
position, so the next token of id i is i + 1 and any misplaced token shows
up as a wrong number.
"""

import collections
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxlstm
from jaxlstm.data import (
    TBPTTBatches,
    Vocab,
    clean_text,
    eval_windows,
    normalize_newlines,
    prepare_corpus,
    read_text,
    split_stream,
    strip_gutenberg,
    tokenize,
    tokens_needed,
)
from jaxlstm.errors import InputError

# Folder that contains the jaxlstm package under test, for subprocesses.
PACKAGE_PARENT = Path(jaxlstm.__file__).resolve().parents[1]
PG100_FILE = "pg100-2011.txt"


def _has_number(message: str, number: int) -> bool:
    """Return whether `number` appears in `message` as a whole number."""
    return re.search(rf"(?<!\d){number}(?!\d)", message) is not None


# normalize_newlines


def test_normalize_newlines_drops_bom():
    assert normalize_newlines("\ufeffTo be") == "To be"


def test_normalize_newlines_keeps_inner_bom():
    assert normalize_newlines("a\ufeffb") == "a\ufeffb"


def test_normalize_newlines_crlf_to_lf():
    assert normalize_newlines("one\r\ntwo\r\n\r\nthree") == "one\ntwo\n\nthree"


def test_normalize_newlines_lone_cr_to_lf():
    assert normalize_newlines("one\rtwo\r") == "one\ntwo\n"


def test_normalize_newlines_mixed_ends():
    assert normalize_newlines("a\r\r\nb\nc\r") == "a\n\nb\nc\n"


# read_text


def test_read_text_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(InputError) as excinfo:
        read_text(path)
    message = str(excinfo.value)
    assert "not found" in message
    assert str(path) in message


def test_read_text_folder(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_text(tmp_path)
    message = str(excinfo.value)
    assert "folder" in message
    assert str(tmp_path) in message


@pytest.mark.parametrize(
    "content", [b"", b"   ", b" \r\n\t\n"], ids=["empty", "spaces", "blank"]
)
def test_read_text_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(InputError) as excinfo:
        read_text(path)
    message = str(excinfo.value)
    assert "empty" in message
    assert str(path) in message


def test_read_text_invalid_utf8(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"abc\xffdef")
    with pytest.raises(InputError) as excinfo:
        read_text(path)
    message = str(excinfo.value)
    assert re.search(r"offset 3\b", message), message
    assert "--encoding" in message
    assert "utf-8" in message


def test_read_text_unknown_encoding(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"to be or not to be\n")
    with pytest.raises(InputError) as excinfo:
        read_text(path, encoding="no-such-codec")
    message = str(excinfo.value)
    assert "no-such-codec" in message
    assert "--encoding" in message


def test_read_text_latin1(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"abc\xffdef")
    assert read_text(path, encoding="latin-1") == "abc\u00ffdef"


def test_read_text_normalises_newlines(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes("\ufeffone\r\ntwo\rthree\n".encode())
    assert read_text(str(path)) == "one\ntwo\nthree\n"


# strip_gutenberg on synthetic texts

GUTENBERG_HEADER = (
    "The Project Gutenberg EBook of Sonnets, by William Shakespeare\n"
    "This eBook is for the use of anyone anywhere at no cost\n"
    "Release Date: January, 1994\n\n"
)
GUTENBERG_BODY = (
    "SONNET 1\n"
    "From fairest creatures we desire increase,\n"
    "That thereby beauty's rose might never die,\n"
)
GUTENBERG_FOOTER = (
    "Updated editions will replace the previous one\n"
    "START: FULL LICENSE\n"
    "Section 1. General Terms of Use and Redistributing\n"
)
MARKER_FORMS = {
    "old": (
        "*** START OF THIS PROJECT GUTENBERG EBOOK SONNETS ***",
        "*** END OF THIS PROJECT GUTENBERG EBOOK SONNETS ***",
    ),
    "current": (
        "*** START OF THE PROJECT GUTENBERG EBOOK SONNETS ***",
        "*** END OF THE PROJECT GUTENBERG EBOOK SONNETS ***",
    ),
}


@pytest.mark.parametrize("form", sorted(MARKER_FORMS))
def test_strip_gutenberg_marker_forms(form):
    start, end = MARKER_FORMS[form]
    text = (
        f"{GUTENBERG_HEADER}{start}\n\n{GUTENBERG_BODY}\n{end}\n"
        f"{GUTENBERG_FOOTER}"
    )
    body = strip_gutenberg(text)
    assert GUTENBERG_BODY in body
    assert "This eBook is for the use" not in body
    assert "Release Date" not in body
    assert "START OF" not in body
    assert "END OF" not in body
    assert "Updated editions" not in body
    assert "FULL LICENSE" not in body


def test_strip_gutenberg_start_without_end():
    start, _ = MARKER_FORMS["current"]
    body = strip_gutenberg(f"{GUTENBERG_HEADER}{start}\n{GUTENBERG_BODY}")
    assert GUTENBERG_BODY in body
    assert "This eBook is for the use" not in body


def test_strip_gutenberg_without_markers_unchanged():
    text = (
        "To be, or not to be: that is the question.\n"
        "<<an aside in angle brackets>>\n"
        "End of the Project Gutenberg EBook, said no one.\n"
    )
    assert strip_gutenberg(text) == text


# strip_gutenberg on the real Complete Works (pg100 as served in 2011)


@pytest.fixture(scope="session")
def pg100_body(data_dir):
    return strip_gutenberg(read_text(data_dir / PG100_FILE))


@pytest.fixture(scope="session")
def pg100_tokens(pg100_body):
    return tokenize(clean_text(pg100_body, "lesson"), "word")


@pytest.fixture(scope="session")
def pg100_corpus(data_dir):
    text = read_text(data_dir / PG100_FILE)
    return prepare_corpus(
        text, level="word", clean="lesson", min_count=5, val_fraction=0.1
    )


def test_strip_gutenberg_pg100_header_gone(pg100_body):
    assert "PROJECT GUTENBERG" not in pg100_body
    assert "This eBook is for the use of anyone" not in pg100_body
    assert "Posting Date" not in pg100_body
    assert "*** START" not in pg100_body


def test_strip_gutenberg_pg100_preamble_gone(pg100_body):
    head = pg100_body[: pg100_body.index("THE SONNETS")].lower()
    assert "project gutenberg" not in head
    assert "copyright" not in head
    assert "small print" not in head


def test_strip_gutenberg_pg100_notices_gone(pg100_body):
    assert "<<" not in pg100_body
    assert ">>" not in pg100_body
    assert "THIS ELECTRONIC VERSION" not in pg100_body


def test_strip_gutenberg_pg100_small_print_gone(pg100_body):
    assert "SMALL PRINT" not in pg100_body
    assert "LIMITED WARRANTY" not in pg100_body
    assert "Charles B. Kramer" not in pg100_body


def test_strip_gutenberg_pg100_first_work_kept(pg100_body):
    assert "THE SONNETS" in pg100_body
    assert "From fairest creatures we desire increase" in pg100_body


def test_strip_gutenberg_pg100_last_work_kept(pg100_body):
    assert "And new pervert a reconciled maid" in pg100_body
    assert pg100_body.rstrip().endswith("reconciled maid.'\n\nTHE END")


def test_strip_gutenberg_pg100_footer_gone(pg100_body):
    assert "*** END" not in pg100_body
    assert "FULL LICENSE" not in pg100_body
    assert "End of the Project Gutenberg" not in pg100_body


# clean_text


def test_clean_text_lesson_lower_case():
    assert clean_text("To BE or Not", "lesson") == "to be or not"


def test_clean_text_lesson_punctuation_separates():
    separators = string.punctuation.replace("-", "").replace("'", "")
    for mark in separators:
        cleaned = clean_text(f"a{mark}b", "lesson")
        assert cleaned == "a b", f"{mark!r} gave {cleaned!r}"


def test_clean_text_lesson_keeps_hyphen_apostrophe():
    cleaned = clean_text("O'er self-substantial fuel.", "lesson")
    assert cleaned == "o'er self-substantial fuel"


def test_clean_text_lesson_line_end_separates():
    cleaned = clean_text("end of line\nnext line", "lesson")
    assert cleaned == "end of line next line"
    assert "linenext" not in cleaned


@pytest.mark.parametrize("line_end", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_clean_text_lesson_other_line_ends(line_end):
    text = normalize_newlines(f"end of line{line_end}next line")
    assert clean_text(text, "lesson") == "end of line next line"


def test_clean_text_lesson_collapses_whitespace():
    text = "  to \t be\n\n\n or,  not  \n"
    assert clean_text(text, "lesson") == "to be or not"


def test_clean_text_none_unchanged():
    text = "To be, or NOT to be:\n\n  that is the question.\n"
    assert clean_text(text, "none") == text


def test_clean_text_invalid_mode():
    with pytest.raises(InputError) as excinfo:
        clean_text("to be", "shout")
    assert "shout" in str(excinfo.value)


# tokenize


def test_tokenize_word():
    assert tokenize("to be  or\nnot", "word") == ["to", "be", "or", "not"]


def test_tokenize_char():
    assert tokenize("to b\n", "char") == ["t", "o", " ", "b", "\n"]


def test_tokenize_invalid_level():
    with pytest.raises(InputError) as excinfo:
        tokenize("to be", "sentence")
    message = str(excinfo.value)
    assert "sentence" in message
    assert "word" in message


# Vocab


def test_vocab_unknown_words_get_own_ids():
    tokens = "the unknown <unk> the unknown <unk> the".split()
    vocab = Vocab.build(tokens, "word", min_count=0)
    unknown_id, unk_id = vocab.encode(["unknown", "<unk>"])
    assert unknown_id != Vocab.UNKNOWN_ID
    assert unk_id != Vocab.UNKNOWN_ID
    assert unknown_id != unk_id


def test_vocab_unknown_words_round_trip():
    tokens = "the unknown <unk> the unknown <unk> the".split()
    vocab = Vocab.build(tokens, "word", min_count=0)
    decoded = vocab.decode(vocab.encode(["unknown", "<unk>", "the"]))
    assert decoded == "unknown <unk> the"


def test_vocab_ids_dense():
    tokens = list("aaaabbbccd") + ["word", "word", "x"]
    vocab = Vocab.build(tokens, "word", min_count=0)
    ids = vocab.encode(sorted(set(tokens)))
    assert sorted(ids.tolist()) == list(range(1, vocab.size))
    assert vocab.size == len(set(tokens)) + 1


def test_vocab_unseen_word_gets_zero():
    vocab = Vocab.build(["to", "be", "to"], "word", min_count=0)
    assert vocab.encode(["question"]).tolist() == [0]
    assert vocab.decode([0]) == "<unk>"


def test_vocab_min_count_exclusive():
    tokens = ["five"] * 5 + ["six"] * 6 + ["one"]
    vocab = Vocab.build(tokens, "word", min_count=5)
    assert "five" not in vocab.tokens
    assert "six" in vocab.tokens
    assert "one" not in vocab.tokens
    assert vocab.encode(["five", "six"]).tolist() == [0, 1]
    assert vocab.size == 2


def test_vocab_order_by_count_then_token():
    tokens = "b a c a d b a".split()
    vocab = Vocab.build(tokens, "word", min_count=0)
    # a: 3, b: 2, then the ties c and d (1 each) in string order.
    assert vocab.tokens == ("a", "b", "c", "d")


# Builds a vocabulary where most tokens tie on their count and prints it, so
# that two processes with different string hash seeds can be compared.
_VOCAB_ORDER_SCRIPT = """
import json
from jaxlstm.data import Vocab
words = [f"w{i:03d}" for i in range(300)]
tokens = words[::-1] * 2 + words[::7] + ["zeta", "alpha", "mid"] * 4
vocab = Vocab.build(tokens, "word", min_count=0)
print(json.dumps(list(vocab.tokens)))
"""


def _vocab_tokens_with_hash_seed(seed: str) -> list[str]:
    python_path = str(PACKAGE_PARENT)
    if os.environ.get("PYTHONPATH"):
        python_path += os.pathsep + os.environ["PYTHONPATH"]
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-c", _VOCAB_ORDER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def test_vocab_order_independent_of_hash_seed():
    first = _vocab_tokens_with_hash_seed("1")
    second = _vocab_tokens_with_hash_seed("2")
    assert len(first) == 303
    assert first == second


@pytest.mark.parametrize("level", ["word", "char"])
def test_vocab_json_round_trip(level):
    if level == "word":
        tokens = ["the", "naïve", 'say "no"', "unknown", "<unk>", "o'er"]
    else:
        tokens = list("ab\n \"'é\t")
    vocab = Vocab.build(tokens, level, min_count=0)
    restored = Vocab.from_json(vocab.to_json())
    assert restored == vocab
    assert restored.encode(tokens).tolist() == vocab.encode(tokens).tolist()


def test_vocab_from_json_garbage():
    with pytest.raises(InputError) as excinfo:
        Vocab.from_json("{not json", source="run/vocab.json")
    message = str(excinfo.value)
    assert "run/vocab.json" in message
    assert "not valid JSON" in message


@pytest.mark.parametrize(
    "text", ["[1, 2]", '"tokens"', '{"format": 1, "level": "word"}']
)
def test_vocab_from_json_not_vocabulary(text):
    with pytest.raises(InputError) as excinfo:
        Vocab.from_json(text)
    assert "not a jaxlstm vocabulary" in str(excinfo.value)


def test_vocab_from_json_newer_format():
    text = json.dumps({"format": 2, "level": "word", "tokens": ["a"]})
    with pytest.raises(InputError) as excinfo:
        Vocab.from_json(text)
    message = str(excinfo.value)
    assert "format 2" in message
    assert "upgrade" in message


@pytest.mark.parametrize(
    "body",
    [
        {"format": 1, "tokens": ["a"]},
        {"format": 1, "tokens": 5, "level": "word"},
    ],
    ids=["missing-level", "tokens-not-list"],
)
def test_vocab_from_json_bad_fields(body):
    with pytest.raises(InputError):
        Vocab.from_json(json.dumps(body))


# prepare_corpus on the real Complete Works


def test_prepare_corpus_pg100_unknown_is_word(pg100_corpus):
    vocab = pg100_corpus.vocab
    assert "unknown" in vocab.tokens
    assert vocab.encode(["unknown"]).tolist() != [Vocab.UNKNOWN_ID]


def test_prepare_corpus_pg100_vocab_size(pg100_corpus):
    # Observed: 7427 ids with the 2011 file, words seen more than 5 times.
    assert 7000 <= pg100_corpus.vocab.size <= 9000


def test_prepare_corpus_pg100_split_sizes(pg100_corpus, pg100_tokens):
    n_train = len(pg100_corpus.train_ids)
    n_val = len(pg100_corpus.val_ids)
    assert n_train + n_val == len(pg100_tokens)
    assert abs(n_val - 0.1 * len(pg100_tokens)) <= 0.5


def test_prepare_corpus_pg100_validation_is_tail(pg100_corpus, pg100_tokens):
    vocab = pg100_corpus.vocab
    n_train = len(pg100_corpus.train_ids)
    expected_val = vocab.encode(pg100_tokens[n_train:])
    expected_train = vocab.encode(pg100_tokens[:n_train])
    assert np.array_equal(pg100_corpus.val_ids, expected_val)
    assert np.array_equal(pg100_corpus.train_ids, expected_train)
    # The Lover's Complaint ends: "...a reconciled maid.'\n\nTHE END".
    assert vocab.decode(pg100_corpus.val_ids[-4:]) == "maid ' the end"


def test_prepare_corpus_pg100_vocab_from_train(pg100_corpus, pg100_tokens):
    n_train = len(pg100_corpus.train_ids)
    counts = collections.Counter(pg100_tokens[:n_train])
    expected = {token for token, count in counts.items() if count > 5}
    assert set(pg100_corpus.vocab.tokens) == expected


# split_stream


@pytest.mark.parametrize(
    ("length", "fraction", "val_length"),
    [(100, 0.1, 10), (1003, 0.1, 100), (50, 0.2, 10), (7, 0.3, 2)],
)
def test_split_stream_lengths(length, fraction, val_length):
    ids = np.arange(length)
    train, val = split_stream(ids, fraction)
    assert len(val) == val_length
    assert len(train) == length - val_length
    assert np.array_equal(np.concatenate([train, val]), ids)


# TBPTTBatches

# (stream length, batch size, sequence length). In the first and third
# cases N - 1 is a multiple of batch * seq, so the rows cover the stream with
# no tokens left over.
TBPTT_CASES = [(1001, 4, 25), (1003, 7, 5), (13, 3, 4), (120, 5, 7)]


def _stack_windows(batches) -> tuple[np.ndarray, np.ndarray]:
    """Join all windows along time into `<int>[batch, windows * seq]`."""
    windows = list(batches)
    inputs = np.concatenate([w.inputs for w in windows], axis=1)
    targets = np.concatenate([w.targets for w in windows], axis=1)
    return inputs, targets


@pytest.mark.parametrize(("length", "batch", "seq"), TBPTT_CASES)
def test_tbptt_targets_are_next_tokens(length, batch, seq):
    batches = TBPTTBatches(np.arange(length), batch, seq)
    for window in batches:
        assert np.array_equal(window.targets, window.inputs + 1)
        assert window.targets.max() <= length - 1


@pytest.mark.parametrize(("length", "batch", "seq"), TBPTT_CASES)
def test_tbptt_windows_continue_rows(length, batch, seq):
    windows = list(TBPTTBatches(np.arange(length), batch, seq))
    for k in range(len(windows) - 1):
        previous_end = windows[k].inputs[:, -1]
        next_start = windows[k + 1].inputs[:, 0]
        assert np.array_equal(next_start, previous_end + 1), f"window {k}"


@pytest.mark.parametrize(("length", "batch", "seq"), TBPTT_CASES)
def test_tbptt_rows_contiguous_in_order(length, batch, seq):
    inputs, _ = _stack_windows(TBPTTBatches(np.arange(length), batch, seq))
    row_length = inputs.shape[1]
    assert inputs[0, 0] == 0
    for r in range(batch):
        start = inputs[r, 0]
        expected = np.arange(start, start + row_length)
        assert np.array_equal(inputs[r], expected), f"row {r}"
    for r in range(batch - 1):
        assert inputs[r + 1, 0] > inputs[r, -1], f"rows {r} and {r + 1}"


@pytest.mark.parametrize(
    ("length", "batch", "seq"), [(1001, 4, 25), (13, 3, 4)]
)
def test_tbptt_rows_cover_prefix(length, batch, seq):
    inputs, targets = _stack_windows(
        TBPTTBatches(np.arange(length), batch, seq)
    )
    assert np.array_equal(inputs.reshape(-1), np.arange(length - 1))
    assert np.array_equal(targets.reshape(-1), np.arange(1, length))


@pytest.mark.parametrize(("length", "batch", "seq"), TBPTT_CASES)
def test_tbptt_no_token_in_two_rows(length, batch, seq):
    inputs, _ = _stack_windows(TBPTTBatches(np.arange(length), batch, seq))
    assert np.unique(inputs).size == inputs.size


@pytest.mark.parametrize(("length", "batch", "seq"), TBPTT_CASES)
def test_tbptt_window_count_and_shape(length, batch, seq):
    batches = TBPTTBatches(np.arange(length), batch, seq)
    windows = list(batches)
    expected_count = ((length - 1) // batch) // seq
    assert len(batches) == expected_count
    assert len(windows) == expected_count
    for window in windows:
        assert window.inputs.shape == (batch, seq)
        assert window.targets.shape == (batch, seq)
        assert np.all(window.weights == 1.0)


def test_tbptt_short_stream_message():
    batch, seq = 4, 5
    needed = batch * seq + 1
    length = needed - 1
    with pytest.raises(InputError) as excinfo:
        TBPTTBatches(np.arange(length), batch, seq)
    message = str(excinfo.value)
    assert _has_number(message, needed), message
    assert _has_number(message, length), message
    assert "--batch-size" in message
    assert "--seq-len" in message


def test_tbptt_exact_minimum_stream():
    batch, seq = 4, 5
    length = tokens_needed(batch, seq)
    batches = TBPTTBatches(np.arange(length), batch, seq)
    assert len(batches) == 1
    with pytest.raises(InputError):
        TBPTTBatches(np.arange(length - 1), batch, seq)


# eval_windows

# (stream length, batch size, sequence length), with rows that do not fill
# their last window, rows left empty, and a stream shorter than the batch.
EVAL_CASES = [
    (1003, 7, 5),
    (2, 3, 4),
    (10, 4, 3),
    (11, 4, 3),
    (50, 1, 7),
    (5, 8, 2),
]


def _weighted(windows, field: str) -> np.ndarray:
    """Return the values of `field` at positions of weight 1, all windows."""
    values = [getattr(w, field)[w.weights == 1.0] for w in windows]
    return np.concatenate(values)


@pytest.mark.parametrize(("length", "batch", "seq"), EVAL_CASES)
def test_eval_windows_scores_each_target_once(length, batch, seq):
    windows = eval_windows(np.arange(length), batch, seq)
    scored = np.sort(_weighted(windows, "targets"))
    assert np.array_equal(scored, np.arange(1, length))


@pytest.mark.parametrize(("length", "batch", "seq"), EVAL_CASES)
def test_eval_windows_targets_follow_inputs(length, batch, seq):
    windows = eval_windows(np.arange(length), batch, seq)
    targets = _weighted(windows, "targets")
    inputs = _weighted(windows, "inputs")
    assert np.array_equal(targets, inputs + 1)


@pytest.mark.parametrize(("length", "batch", "seq"), EVAL_CASES)
def test_eval_windows_shapes(length, batch, seq):
    windows = eval_windows(np.arange(length), batch, seq)
    assert windows
    for window in windows:
        assert window.inputs.shape == (batch, seq)
        assert window.targets.shape == (batch, seq)
        assert window.weights.shape == (batch, seq)


@pytest.mark.parametrize(("length", "batch", "seq"), EVAL_CASES)
def test_eval_windows_rows_contiguous(length, batch, seq):
    windows = eval_windows(np.arange(length), batch, seq)
    inputs = np.concatenate([w.inputs for w in windows], axis=1)
    weights = np.concatenate([w.weights for w in windows], axis=1)
    for r in range(batch):
        scored = int(weights[r].sum())
        # Weight 1 on a prefix of the row, then padding.
        assert np.all(weights[r, :scored] == 1.0), f"row {r}"
        assert np.all(weights[r, scored:] == 0.0), f"row {r}"
        if scored == 0:
            continue
        row = inputs[r, :scored]
        expected = np.arange(row[0], row[0] + scored)
        assert np.array_equal(row, expected), f"row {r}"


@pytest.mark.parametrize("length", [0, 1])
def test_eval_windows_too_short(length):
    with pytest.raises(InputError) as excinfo:
        eval_windows(np.arange(length), 4, 3)
    assert "--val-fraction" in str(excinfo.value)
