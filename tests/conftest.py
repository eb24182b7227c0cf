"""Every test runs with a neutral working directory, so child processes (`python -c`, `-m`,
scripts) never get the project root on sys.path, where its kernels/ would shadow Hugging Face's
`kernels` package (tests/test_root_on_path.py puts it there on purpose)."""
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _neutral_cwd(tmp_path_factory):
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
