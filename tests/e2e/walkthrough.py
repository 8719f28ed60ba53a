"""The README's walk-through, run as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough_script() -> str:
    """The shell code between the walk-through markers of the README."""
    text = README.read_text()
    section = text.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, "the README has no walk-through block"
    return "\n".join(blocks)


def run_walkthrough(hub: str, key: str, upstream: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the walk-through with bash against ``hub``; fail on the first failing command."""
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + walkthrough_script()],
        env={**env, "HUB": hub, "KEY": key, "UPSTREAM": upstream},
        capture_output=True, text=True, timeout=90,
    )
