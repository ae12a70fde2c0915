"""`make gpu-check`: the first command to run on a GPU machine. Runs the CUDA tests
(`pytest -m cuda`) and `gpu_train_throughput.py` inside a time budget (10 minutes by default)
and writes `benchmarks/results/gpu-check-<device>.json` and `.md`, named after the GPU.

    python benchmarks/gpu_check.py [--budget 600] [--out benchmarks/results]
    python benchmarks/gpu_check.py --cpu   # the same on the CPU, benchmark scaled down (a smoke test)

Exits non-zero when a test fails or errors, or the benchmark does not finish; the report is
written either way, with the tail of what failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """(exit code, last 4000 characters of output, seconds); 124 on timeout."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code = 124
        output = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        output += f"\n[timed out after {timeout:.0f} s]"
    return code, output[-4000:], time.perf_counter() - start


def test_outcomes(junit: Path) -> dict[str, str]:
    """test id -> passed | failed | error | skipped: <reason>, from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        child = next(iter(case), None)
        if child is None or child.tag in ("system-out", "system-err"):
            outcomes[name] = "passed"
        elif child.tag == "skipped":
            outcomes[name] = f"skipped: {child.get('message', '')}"
        else:
            outcomes[name] = child.tag
    return outcomes


def markdown(report: dict) -> str:
    lines = [
        f"# gpu-check: {report['device_name']}",
        "",
        f"{report['date']}, torch {report['torch']}, Python {report['python']}; tests {report['tests']['seconds']:.0f} s "
        f"(exit {report['tests']['exit_code']}), benchmark {report['benchmark']['seconds']:.0f} s "
        f"(exit {report['benchmark']['exit_code']}).",
        "",
        "## Tests (`pytest -m cuda`)",
        "",
        "| test | outcome |",
        "| --- | --- |",
    ]
    lines += [f"| `{name}` | {outcome} |" for name, outcome in report["tests"]["outcomes"].items()]
    if report["tests"]["exit_code"] not in (0, 5):
        lines += ["", "```", report["tests"]["tail"], "```"]
    lines += ["", "## Benchmark", ""]
    if report["benchmark"].get("markdown"):
        lines.append(
            report["benchmark"]["markdown"].replace("# GPU training throughput", "### GPU training throughput")
        )
    else:
        lines += ["```", report["benchmark"]["tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=600, help="seconds for tests and benchmark together")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--cpu", action="store_true", help="smoke test on a machine without CUDA")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print(
            f"gpu-check: torch {torch.__version__} sees no CUDA device. Run it on a GPU machine (or --cpu for a "
            "smoke test of this script).",
            file=sys.stderr,
        )
        return 2
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu"
    started = time.perf_counter()
    report: dict = {
        "check": "gpu-check",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device_name": device_name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        code, tail, seconds = run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "cuda",
                "-q",
                "-rA",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
            ],
            timeout=0.45 * args.budget,
        )
        report["tests"] = {"exit_code": code, "seconds": seconds, "outcomes": test_outcomes(junit), "tail": tail}
        bench = [sys.executable, str(HERE / "gpu_train_throughput.py"), "--out", tmp]
        bench += ["--device", "cpu", "--small", "--steps", "3", "--warmup", "1"] if args.cpu else []
        remaining = args.budget - (time.perf_counter() - started) - 15
        code_b, tail_b, seconds_b = run(bench, timeout=max(remaining, 30))
        written = sorted(Path(tmp).glob("gpu_train_throughput-*.json"))
        report["benchmark"] = {
            "exit_code": code_b,
            "seconds": seconds_b,
            "tail": tail_b,
            "result": json.loads(written[0].read_text()) if written else None,
            "markdown": written[0].with_suffix(".md").read_text() if written else "",
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    stem = out / f"gpu-check-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and .md")
    # pytest exits 5 when no test was collected (a CPU smoke run: every cuda test is skipped, not deselected)
    return 0 if code in (0, 5) and code_b == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
