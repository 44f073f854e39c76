"""Servers shared by the HTTP test modules, one per settings profile; a module whose tests need other
settings, or a pristine server, starts its own. Every test on a shared server leaves it idle and
mutates nothing it does not own."""

from __future__ import annotations

import pytest

from server.http.settings import Settings
from support.http import serve


@pytest.fixture(scope="session")
def default_server(adapter_dirs):
    """Default settings with the session's adapters alpha, beta and gamma."""
    with serve(Settings(adapters=[f"{name}={path}" for name, path in adapter_dirs.items()])) as served:
        yield served
