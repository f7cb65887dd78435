"""The app's shared fixtures: the embedded model (or its stand-in) and a launched app.

The tests use the shipped embedded model when ``assets/tiny-moe-vlm`` exists. Otherwise they
build a random-weight stand-in of the same recipe and point ``MOPEQ_EMBEDDED_DIR`` at it, so they
never skip; only the accuracy values differ.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-moe-vlm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    """A random-weight model of the embedded recipe (built once per test session)."""
    from mopeq.embedded import tiny

    folder = tmp_path_factory.mktemp("tiny-moe-vlm-standin")
    model, processor = tiny.new_model(tiny.TinyRecipe())
    tiny.save(model, processor, folder)
    return folder


@pytest.fixture(scope="module")
def embedded_model(request) -> Path:
    """The embedded model folder: the shipped asset, or the stand-in while it is missing.

    The stand-in is set through ``MOPEQ_EMBEDDED_DIR`` for this module only, so other test
    modules still see the real state of ``assets/``.
    """
    if "MOPEQ_EMBEDDED_DIR" in os.environ or (ASSET / "config.json").exists():
        yield Path(os.environ.get("MOPEQ_EMBEDDED_DIR", ASSET))
        return
    folder = request.getfixturevalue("standin_dir")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOPEQ_EMBEDDED_DIR", str(folder))
        yield folder


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll the app's config until it answers (bounded): a cold start may take a while."""
    import urllib.request

    deadline, error = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/config", timeout=10) as reply:
                if reply.status == 200:
                    return
        except OSError as exc:  # refused or reset while the server starts
            error = exc
        time.sleep(0.5)
    raise TimeoutError(f"the app at {url} did not answer within {timeout_s:.0f} s: {error}")


@pytest.fixture(scope="module")
def app_url(embedded_model):
    """A launched app (in this process, on a free port) that answers; its URL."""
    import app

    demo = app.build_demo()
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1",
                            server_port=_free_port(), quiet=True)
    wait_ready(url)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False)
