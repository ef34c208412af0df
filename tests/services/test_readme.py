"""The README's Python client example runs as written against live services (only the addresses differ)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python client"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


def test_readme_client_example_runs(services) -> None:
    code = python_example().replace('"127.0.0.1:7001"', repr(services.prefill)).replace(
        '"127.0.0.1:7002"', repr(services.decode))
    assert repr(services.prefill) in code and repr(services.decode) in code  # the addresses were there to swap
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    # result.text, then finish_reason, cached_tokens and ttft_s; then the streamed text
    assert re.search(r" (stop|length) \d+ \d+\.\d+\n.", out.getvalue(), re.S), out.getvalue()
