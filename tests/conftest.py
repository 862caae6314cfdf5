"""Fixtures shared by the jaxlstm tests."""

import os
from pathlib import Path

import pytest

# Environment variable naming the folder with the real corpora,
# tinyshakespeare.txt and pg100-2011.txt.
DATA_DIR_ENV = "JAXLSTM_DATA_DIR"
PG100_FILE = "pg100-2011.txt"
TINY_FILE = "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Return the folder named by $JAXLSTM_DATA_DIR.

    Skip the test when the variable is unset or the folder does not contain
    pg100-2011.txt, the file that the tests on real text read.
    """
    value = os.environ.get(DATA_DIR_ENV, "")
    if not value:
        pytest.skip(
            f"{DATA_DIR_ENV} is not set; set it to the folder that contains "
            f"{PG100_FILE} to run the tests on real text"
        )
    folder = Path(value)
    if not (folder / PG100_FILE).is_file():
        pytest.skip(
            f"{DATA_DIR_ENV}={value!r} does not contain {PG100_FILE}; "
            "the tests on real text need it"
        )
    return folder


@pytest.fixture(scope="session")
def shakespeare(data_dir, tmp_path_factory) -> Path:
    """Return a file with the first 60,000 characters of tinyshakespeare."""
    source = data_dir / TINY_FILE
    if not source.is_file():
        pytest.skip(f"{DATA_DIR_ENV} does not contain {TINY_FILE}")
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(source.read_text("utf-8")[:60_000], "utf-8")
    return path
