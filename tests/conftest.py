"""Skips shared by every test folder: `@pytest.mark.bwrap` tests need the bubblewrap sandbox."""
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    if shutil.which("bwrap") is None:
        skip = pytest.mark.skip(reason="bubblewrap not installed (scripts/setup.sh installs it)")
        for item in items:
            if item.get_closest_marker("bwrap") is not None:
                item.add_marker(skip)
