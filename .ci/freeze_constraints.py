"""Write constraints.txt from the running environment (pip freeze), for the README's `-c`.

Usage: python .ci/freeze_constraints.py OUT [--note TEXT]
Drops fastlm itself (editable) and pip; writes torch without its local build label
(`2.13.0+cpu` -> `2.13.0`), so the same file serves the CPU wheel the README installs and
any other build of that version.
"""

import argparse
import datetime
import os
import platform
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--note", default="", help="one line on where these versions were tested")
    args = ap.parse_args()
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.split("\n")
    pins = []
    for line in freeze:
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        name, version = line.split("==", 1)
        if name.lower() in {"pip", "fastlm"}:
            continue
        pins.append(f"{name}=={version.split('+', 1)[0]}")
    pins.sort(key=str.lower)
    head = [
        "# The versions the test suite last passed on (CPU, Linux x86_64, Python "
        f"{platform.python_version()}), {datetime.date.today().isoformat()}.",
        "# Used by the README's install command (`pip install -c constraints.txt ...`): a fresh machine",
        "# gets what CI tested. Regenerate only from an environment where the suite passed:",
        "#   bench/check_latest.sh --write-constraints   (newest versions, tests, then this file)",
        "# Other Pythons may lack wheels for some pins (numpy >= 2.3 needs Python >= 3.11): drop -c there.",
    ]
    if args.note:
        head.append(f"# {args.note}")
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(head + pins) + "\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {len(pins)} pins to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
