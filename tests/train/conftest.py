"""Fixtures of the training-option tests (tests/train/): a token cache shared by a module's runs."""
import pytest


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))
