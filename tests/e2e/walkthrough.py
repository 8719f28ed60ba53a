"""The README's walk-through, run as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def walkthrough_script(name: str = "walkthrough") -> str:
    """The shell code between the ``name`` markers of the README."""
    text = README.read_text()
    section = text.split(f"<!-- {name}:start -->", 1)[1].split(f"<!-- {name}:end -->", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert blocks, f"the README has no {name} block"
    return "\n".join(blocks)


def shell_functions() -> str:
    """The walk-through's shell functions (``hub``, ``id_of``), which later sections use."""
    return "\n".join(line for line in walkthrough_script().splitlines() if re.match(r"^\w+\(\) \{", line))


def run_walkthrough(
    hub: str, key: str, upstream: str, env: dict[str, str], name: str = "walkthrough"
) -> subprocess.CompletedProcess[str]:
    """Run a walk-through section with bash against ``hub``; fail on the first failing command."""
    script = walkthrough_script(name) if name == "walkthrough" else shell_functions() + "\n" + walkthrough_script(name)
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        env={**env, "HUB": hub, "KEY": key, "UPSTREAM": upstream},
        capture_output=True, text=True, timeout=90,
    )
