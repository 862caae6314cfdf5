"""Corpus text, cleaning, vocabulary and stateful batches.

The pipeline is: read the text (`read_text`), cut the Project Gutenberg
licence off (`strip_gutenberg`), clean it (`clean_text`), split it into
tokens (`tokenize`), build a `Vocab`, encode, split off the last fraction for
validation (`split_stream`) and cut the training stream into windows for
truncated backpropagation through time (`TBPTTBatches`).
"""

import collections
import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxlstm.errors import InputError

logger = logging.getLogger(__name__)

VOCAB_FORMAT = 1
UNKNOWN_DISPLAY = "<unk>"

# Both the pre-2016 form ("*** START OF THIS PROJECT GUTENBERG EBOOK ...")
# and the current one ("*** START OF THE PROJECT GUTENBERG EBOOK ...").
_START = re.compile(
    r"^\*{3}\s*START OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$",
    re.IGNORECASE | re.MULTILINE,
)
_END = re.compile(
    r"^\*{3}\s*END OF (?:THIS|THE) PROJECT GUTENBERG E-?BOOK.*$",
    re.IGNORECASE | re.MULTILINE,
)
# The 1990s World Library edition repeats a copyright notice in double angle
# brackets between the works. Before the first work it has a Project
# Gutenberg preamble and a "SMALL PRINT!" licence that ends with a line of
# asterisks around "SMALL PRINT!" and a version line such as
# ["Small Print" V.12.08.93].
_NOTICE = re.compile(r"<<[^<>]*>>", re.DOTALL)
_PREAMBLE = re.compile(
    r"\A.*?^\*+\s*SMALL PRINT!.*?^\*+\s*SMALL PRINT!.*?$"
    r"(?:\s*^\[\"Small Print\".*?$)?",
    re.IGNORECASE | re.MULTILINE | re.DOTALL,
)
# Current files open the body with a credit paragraph ("Produced by ...").
_CREDIT = re.compile(r"\A\s*Produced by .*?(?:\n\s*\n|\Z)", re.DOTALL)
# Older files close the body with a plain "End of the Project Gutenberg
# EBook of ..." line just before the END marker.
_END_LINE = re.compile(
    r"^End of (?:the )?Project Gutenberg'?s? E-?Book.*\Z",
    re.IGNORECASE | re.MULTILINE | re.DOTALL,
)

# Everything but letters, digits, whitespace, the hyphen and the apostrophe:
# the lesson removes string.punctuation except "-" and "'", which it keeps
# inside words such as "o'er" and "self-substantial". Unicode punctuation
# (curly quotes, dashes) and symbols are removed the same way, after
# typographic apostrophes become "'". The underscore is punctuation too.
_PUNCTUATION = re.compile(r"[^\w\s'-]|_")
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'"})


def normalize_newlines(text: str) -> str:
    """Drop a leading byte-order mark and turn CRLF and lone CR into LF."""
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """Read a corpus file with normalised line ends.

    Raises:
      InputError: if the path is missing, a folder, empty, or not decodable
        with `encoding`; the message names the byte offset of a bad byte.
    """
    if not str(path):
        raise InputError("--text is empty; pass the path of a text file")
    path = Path(path)
    if not path.exists():
        raise InputError(f"text file {str(path)!r} not found; check the path")
    if path.is_dir():
        raise InputError(
            f"{str(path)!r} is a folder; pass a text file to --text"
        )
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise InputError(
            f"cannot read text file {str(path)!r}: {error.strerror}; check "
            "its permissions"
        ) from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{str(path)!r} is not valid {encoding}: byte "
            f"0x{raw[error.start]:02x} at byte offset {error.start}; "
            "convert the file to UTF-8 or "
            "pass its encoding with --encoding (for example latin-1)"
        ) from None
    except LookupError:
        raise InputError(
            f"unknown encoding {encoding!r}; pass a Python codec name such as "
            "utf-8 or latin-1 to --encoding"
        ) from None
    text = normalize_newlines(text)
    if not text.strip():
        raise InputError(
            f"text file {str(path)!r} is empty; pass a file that contains text"
        )
    return text


def strip_gutenberg(text: str) -> str:
    """Cut a Project Gutenberg licence header and footer off `text`.

    The body is the text between the START and END marker lines, less a
    leading "Produced by" credit, and less the preamble, the "SMALL PRINT!"
    licence and the copyright notices of the World Library edition. Text
    without the markers is returned unchanged, so any local file can go
    through this step.
    """
    start = _START.search(text)
    if start is None:
        return text
    end = _END.search(text, start.end())
    body = text[start.end() : end.start() if end else len(text)]
    body = _END_LINE.sub("", body)
    body = _PREAMBLE.sub("", body, count=1)
    body = _CREDIT.sub("", body, count=1)
    return _NOTICE.sub("", body)


def clean_text(text: str, mode: str) -> str:
    """Clean `text` in one of the two modes.

    Args:
      text: text with normalised newlines.
      mode: "lesson" lower-cases, replaces punctuation and symbols other than
        hyphen and apostrophe with a space and collapses all whitespace, line
        ends included, to single spaces. A line end thus always separates
        two words.
        "none" returns the text unchanged.
    """
    if mode == "none":
        return text
    if mode != "lesson":
        raise InputError(f"clean mode must be 'lesson' or 'none', got {mode!r}")
    text = _PUNCTUATION.sub(" ", text.lower().translate(_APOSTROPHES))
    return " ".join(text.split())


def tokenize(text: str, level: str) -> list[str]:
    """Split cleaned text into words (on whitespace) or characters."""
    if level == "word":
        return text.split()
    if level == "char":
        return list(text)
    raise InputError(f"level must be 'word' or 'char', got {level!r}")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token strings and their ids, with id 0 reserved for unknown tokens.

    Id 0 is not a string in the table, so no token of any text can collide
    with it: a word "unknown" or "<unk>" in the text gets an id of its own.
    Ids 1..len(tokens) are dense and ordered by descending count, then by
    the token string, so the same text gives the same ids in any process.
    """

    tokens: tuple[str, ...]  # the token of id i + 1 is tokens[i]
    level: str

    UNKNOWN_ID = 0

    def __post_init__(self):
        object.__setattr__(
            self, "_ids", {t: i + 1 for i, t in enumerate(self.tokens)}
        )

    @classmethod
    def build(
        cls, tokens: Sequence[str], level: str, min_count: int
    ) -> "Vocab":
        """Keep the tokens seen more than `min_count` times."""
        counts = collections.Counter(tokens)
        kept = [t for t, n in counts.items() if n > min_count]
        kept.sort(key=lambda t: (-counts[t], t))
        return cls(tuple(kept), level)

    @property
    def size(self) -> int:
        """Number of ids, the unknown id included."""
        return len(self.tokens) + 1

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """Map tokens to ids as `<int32>[len(tokens)]`; unseen tokens get 0."""
        ids = self._ids
        return np.fromiter(
            (ids.get(t, 0) for t in tokens), dtype=np.int32, count=len(tokens)
        )

    def unknown_tokens(self, tokens: Sequence[str]) -> list[str]:
        """Return the distinct tokens of `tokens` not in the vocabulary."""
        return sorted({t for t in tokens if t not in self._ids})

    def decode(self, ids: Sequence[int]) -> str:
        """Join the tokens of `ids` with spaces (words) or nothing (chars)."""
        pieces = [
            UNKNOWN_DISPLAY if i == 0 else self.tokens[i - 1] for i in ids
        ]
        return (" " if self.level == "word" else "").join(pieces)

    def to_json(self) -> str:
        """Serialise as JSON; `Vocab.from_json` reads it back."""
        body = {
            "format": VOCAB_FORMAT,
            "level": self.level,
            "unknown_id": 0,
            "tokens": list(self.tokens),
        }
        return json.dumps(body, ensure_ascii=False, indent=0) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "vocab.json") -> "Vocab":
        """Parse a vocabulary written by `to_json`."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{source} is not valid JSON ({error})") from None
        if not isinstance(body, dict) or "tokens" not in body:
            raise InputError(f"{source} is not a jaxlstm vocabulary")
        if body.get("format") != VOCAB_FORMAT:
            raise InputError(
                f"{source} has format {body.get('format')!r} but this jaxlstm "
                f"reads format {VOCAB_FORMAT}; upgrade jaxlstm to read it"
            )
        tokens, level = body["tokens"], body.get("level")
        if not (
            isinstance(tokens, list)
            and all(isinstance(t, str) for t in tokens)
            and level in ("word", "char")
        ):
            raise InputError(
                f"{source} is damaged: it needs a list of token strings and a "
                "level of 'word' or 'char'; retrain to write it again"
            )
        bad = [t for t in tokens if not t or (level == "char" and len(t) != 1)]
        if bad or len(set(tokens)) != len(tokens):
            raise InputError(
                f"{source} is damaged: its tokens must be distinct and "
                f"non-empty{' single characters' if level == 'char' else ''};"
                " retrain to write it again"
            )
        return cls(tuple(tokens), level)


class Corpus(NamedTuple):
    """An encoded corpus split for training and validation."""

    vocab: Vocab
    train_ids: np.ndarray  # <int32>[train tokens]
    val_ids: np.ndarray  # <int32>[validation tokens]


def split_stream(ids: Sequence, val_fraction: float) -> tuple[Sequence, ...]:
    """Split a token stream into its head (training) and last `val_fraction`.

    Each part keeps at least 2 tokens, the least that has a next token.
    """
    n_val = int(round(len(ids) * val_fraction))
    n_val = min(max(n_val, 2), len(ids) - 2)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def prepare_corpus(
    text: str, level: str, clean: str, min_count: int, val_fraction: float
) -> Corpus:
    """Clean, tokenise, build the vocabulary and split `text`.

    The vocabulary is counted on the training part only, so validation
    measures how the model handles words it has not seen.
    """
    tokens = tokenize(clean_text(strip_gutenberg(text), clean), level)
    if len(tokens) < 4:
        raise InputError(
            f"the text has {len(tokens)} tokens after cleaning; a corpus "
            "needs many thousands of tokens to train on"
        )
    train_tokens, val_tokens = split_stream(tokens, val_fraction)
    n_val = len(val_tokens)
    vocab = Vocab.build(train_tokens, level, min_count)
    if vocab.size < 3:
        raise InputError(
            f"--min-count {min_count} keeps {vocab.size - 1} token(s) of the "
            "training text; a model needs at least 2 besides the unknown "
            "token, so pass a lower --min-count or a longer text"
        )
    ids = vocab.encode(tokens)
    logger.info(
        "corpus: %d tokens (%d train, %d validation), vocabulary %d",
        len(ids),
        len(ids) - n_val,
        n_val,
        vocab.size,
    )
    return Corpus(vocab, ids[: len(ids) - n_val], ids[len(ids) - n_val :])


class Batch(NamedTuple):
    """One window of the stream rows."""

    inputs: np.ndarray  # <int32>[batch, seq]
    targets: np.ndarray  # <int32>[batch, seq]
    weights: np.ndarray  # <float32>[batch, seq], 0 marks padding


def tokens_needed(batch_size: int, seq_len: int) -> int:
    """Smallest training stream that gives one full window."""
    return batch_size * seq_len + 1


class TBPTTBatches:
    """Windows of a token stream for truncated backpropagation through time.

    The stream of N tokens is laid out as `batch_size` contiguous rows of
    L = (N - 1) // batch_size input tokens each. Row r reads tokens
    r*L .. r*L + L - 1 and its targets are the tokens one place later, so
    every target is the stream's next token and no row wraps around:

        stream:  t0 t1 t2 ... t(L-1) | tL ... t(2L-1) | ... | t(BL-1) t(BL)
        row 0:   t0 ......... t(L-1)                         inputs
                 t1 ......... tL                             targets
        row 1:                         tL ... t(2L-1)         inputs
                                       t(L+1) ... t(2L)       targets

    Each row is cut into L // seq_len windows of `seq_len` tokens; window k
    of a batch is columns k*seq_len .. (k+1)*seq_len - 1 of every row. The
    LSTM state at the end of window k of a row is therefore the state at the
    start of window k + 1 of the same row; the caller carries it, and resets
    it at each epoch. The last L % seq_len tokens of each row are not
    trained on, so every window has the same shape and compiles once.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int):
        needed = tokens_needed(batch_size, seq_len)
        if len(ids) < needed:
            raise InputError(
                f"the training text has {len(ids)} tokens but one batch of "
                f"{batch_size} rows x {seq_len} steps needs {needed}; pass a "
                "longer text, or a smaller --batch-size or --seq-len"
            )
        row_len = (len(ids) - 1) // batch_size
        self.num_windows = row_len // seq_len
        used = self.num_windows * seq_len
        rows = np.asarray(ids[: batch_size * row_len + 1])
        starts = np.arange(batch_size) * row_len
        index = starts[:, None] + np.arange(used)[None, :]
        self._inputs = rows[index]  # [batch, used]
        self._targets = rows[index + 1]  # [batch, used]
        self._weights = np.ones((batch_size, seq_len), np.float32)
        self.batch_size = batch_size
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.num_windows

    def window(self, k: int) -> Batch:
        """Return window `k` of every row."""
        cols = slice(k * self.seq_len, (k + 1) * self.seq_len)
        return Batch(
            self._inputs[:, cols], self._targets[:, cols], self._weights
        )

    def __iter__(self) -> Iterator[Batch]:
        for k in range(self.num_windows):
            yield self.window(k)


def eval_windows(ids: np.ndarray, batch_size: int, seq_len: int) -> list[Batch]:
    """Cut a whole stream into padded windows that score every target once.

    The layout is the one of `TBPTTBatches`, but rows are ceil((N - 1) /
    batch_size) long and the tail is padded with weight 0, so every one of
    the N - 1 next-token targets is scored exactly once with its state
    carried from the start of its row.
    """
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise InputError(
            f"the validation text has {len(ids)} tokens; it needs at least 2, "
            "so pass a larger --val-fraction or a longer text"
        )
    row_len = -(-n_targets // batch_size)
    row_len = -(-row_len // seq_len) * seq_len
    inputs = np.zeros((batch_size, row_len), np.int32)
    targets = np.zeros((batch_size, row_len), np.int32)
    weights = np.zeros((batch_size, row_len), np.float32)
    per_row = -(-n_targets // batch_size)
    for r in range(batch_size):
        lo = r * per_row
        hi = min(lo + per_row, n_targets)
        if hi <= lo:
            break
        inputs[r, : hi - lo] = ids[lo:hi]
        targets[r, : hi - lo] = ids[lo + 1 : hi + 1]
        weights[r, : hi - lo] = 1.0
    return [
        Batch(
            inputs[:, k : k + seq_len],
            targets[:, k : k + seq_len],
            weights[:, k : k + seq_len],
        )
        for k in range(0, row_len, seq_len)
    ]


def load_text(
    text_path: str | Path | None,
    encoding: str = "utf-8",
    cache_dir: str | Path | None = None,
    url: str | None = None,
) -> str:
    """Read `text_path`, or the corpus at `url` (downloaded once, cached).

    `url` None means Project Gutenberg's Complete Works of Shakespeare.

    Raises:
      InputError: for a bad local file.
      DownloadError: if the default corpus is not cached and cannot be
        downloaded; the message suggests --text.
    """
    if text_path is not None:
        return read_text(text_path, encoding)
    from jaxlstm.download import DEFAULT_URL, fetch_corpus

    return read_text(fetch_corpus(url or DEFAULT_URL, cache_dir=cache_dir))


def vocab_difference(saved: Vocab, built: Vocab) -> str | None:
    """Describe how a vocabulary built now differs from a saved one.

    Returns:
      None when both are identical, else one phrase for an error message.
    """
    if saved == built:
        return None
    if saved.level != built.level:
        return (
            f"checkpoint vocabulary is of {saved.level}s, this run's of "
            f"{built.level}s"
        )
    if saved.size != built.size:
        return (
            f"checkpoint vocabulary has {saved.size} tokens, this text "
            f"gives {built.size}"
        )
    first = next(
        i
        for i, (a, b) in enumerate(zip(saved.tokens, built.tokens, strict=True))
        if a != b
    )
    return (
        f"checkpoint vocabulary has {saved.tokens[first]!r} at id {first + 1}, "
        f"this text gives {built.tokens[first]!r}"
    )
