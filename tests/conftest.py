"""Fixtures shared by the jaxlstm tests."""

import os
from pathlib import Path

import pytest

# Environment variable naming the folder with the real corpora,
# tinyshakespeare.txt and pg100-2011.txt.
DATA_DIR_ENV = "JAXLSTM_DATA_DIR"
PG100_FILE = "pg100-2011.txt"


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
