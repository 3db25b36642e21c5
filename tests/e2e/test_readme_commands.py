"""The README's usage block is a test: every `erasure ...` line of the first ```bash block
under "### Step by step" (in "## Using it") runs, in order, in a fresh directory (the default home `./.erasure`,
no ERASURE_* variables: what a newcomer has), and must exit 0.

Rules, so that the block can stay readable:
- a line ending in `\\` continues on the next; `# ...` comments are dropped;
- `erasure serve ...` is skipped (it runs until stopped; tests/e2e/test_api.py serves);
- `a | b | c` lists alternatives: each runs on its own, and an alternative after the first
  gets the first one's command group (`erasure audit timeline <id> | due ...` runs
  `erasure audit timeline <id>` and `erasure audit due ...`);
- `--records N` runs with `--records 300` (the flow is the same, the time is not);
- `<id>` is the id printed by the latest `erasure request submit ... --json`, `<version>`
  the ensemble version printed by the latest `erasure train ... --json`, `<sha256>` the
  source file's hash printed by the latest `erasure ingest ... --json`; a placeholder that
  nothing earlier printed fails the test, naming the line;
- flows use the test session's Prefect server (PREFECT_API_URL), as with `erasure up`.
A failure names the README line and shows its output.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = Path(os.environ.get("ERASURE_README_UNDER_TEST", ROOT / "README.md"))
RECORDS = "300"
GROUPS = {"audit", "request", "token", "lineage", "db"}


def usage_lines(text: str) -> list[str]:
    """The `erasure ...` lines of the first bash block under '### Step by step' (continuations joined)."""
    section = text.split("\n## Using it", 1)[1].split("\n### Step by step", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    joined, lines = "", []
    for raw in block.splitlines():
        joined += raw.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        if joined.strip().startswith("erasure "):
            lines.append(re.sub(r"\s+", " ", joined.strip()))
        joined = ""
    return lines


def invocations(line: str) -> list[list[str]]:
    """The argument lists one README line stands for (see the module's rules)."""
    alternatives = [shlex.split(part, comments=True) for part in re.split(r" \| ", line.split(" # ")[0])]
    first = alternatives[0]
    if first[1] == "serve":
        return []
    group = first[:2] if first[1] in GROUPS else first[:1]
    runs = [first] + [group + alternative for alternative in alternatives[1:]]
    for args in runs:
        if "--records" in args:
            args[args.index("--records") + 1] = RECORDS
    return runs


def test_the_readme_usage_block_extracts(tmp_path: Path) -> None:
    lines = usage_lines(README.read_text())
    assert lines and all(line.startswith("erasure ") for line in lines)
    assert any("request submit" in line for line in lines) and any("<id>" in line for line in lines)


def test_every_readme_command_runs_in_order(tmp_path: Path, prefect_api_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERASURE_")}
    env.update(PREFECT_API_URL=prefect_api_url, PYTHONPATH=str(ROOT))
    bin_dir = Path(sys.executable).parent
    values: dict[str, str] = {}
    for line in usage_lines(README.read_text()):
        for args in invocations(line):
            command = [values.get(a, a) for a in args]
            missing = [a for a in command if re.fullmatch(r"<[a-z0-9_-]+>", a)]
            assert not missing, (f"README line {line!r}: nothing earlier in the block printed {missing[0]} "
                                 "(see this test's rules)")
            result = subprocess.run([str(bin_dir / "erasure"), *command[1:]], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, (
                f"README line {line!r} ran as {shlex.join(command)!r} and exited {result.returncode}:\n"
                f"{result.stderr[-2000:]}\n{result.stdout[-1000:]}")
            if "--json" in command and command[1:3] == ["request", "submit"]:
                values["<id>"] = json.loads(result.stdout)["id"]
            if "--json" in command and command[1] == "train":
                values["<version>"] = _ensemble_version(json.loads(result.stdout))
            if "--json" in command and command[1] == "ingest":
                values["<sha256>"] = json.loads(result.stdout)["sha256"]


def _ensemble_version(trained: dict) -> str:
    for key in ("ensemble_version", "ensemble_version_id", "version_id", "ensemble"):
        value = trained.get(key)
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("version_id") or value.get("id"), str):
            return value.get("version_id") or value.get("id")
    raise AssertionError(f"`erasure train --json` printed no ensemble version: keys {sorted(trained)}")
