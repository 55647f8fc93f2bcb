from __future__ import annotations

import pytest
import trustme

from tests.runtime.server import RUNTIMES


@pytest.fixture(params=RUNTIMES)
def runtime(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_pem(ca, tmp_path_factory):
    """Server certificate and key for 127.0.0.1, signed by the test CA, in one PEM file."""
    path = tmp_path_factory.mktemp("tls") / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path
