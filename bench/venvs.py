"""Bench-only virtual environments under bench/, built once and then reused.

The proxy itself needs only the stdlib and boto3; everything here (Lyft's
metadataproxy with its old pins, matplotlib, py-spy) is a dependency of the
benchmark alone and lives in gitignored venvs next to this file.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

# metadataproxy 2.2.0's own pins do not build on Python 3.11; this set does.
LYFT_STEPS = [
    ["Flask==1.1.4", "Werkzeug==1.0.1", "Jinja2==2.11.3", "MarkupSafe==2.0.1",
     "itsdangerous==1.1.0", "click==7.1.2", "docker-py==1.10.6",
     "requests==2.22.0", "urllib3==1.25.11", "cachetools==3.1.1",
     "python-json-logger==0.1.11", "blinker==1.4", "gunicorn==19.9.0",
     "gevent", "greenlet", "boto3", "PyYAML"],
    ["--no-deps", "metadataproxy==2.2.0"],
]
TOOLS_STEPS = [["matplotlib", "py-spy"]]   # the plot, and bench/cpu_profile.py

LYFT_VENV = BENCH_DIR / ".venv-lyft"
TOOLS_VENV = BENCH_DIR / ".venv-tools"
MARKER = ".bench-ready"


def ensure_venv(path, steps, log):
    """Create the venv at path with steps' pip installs unless already done.

    A marker file holding the install steps makes a rerun skip the work, and
    a change to the steps rebuild the venv.  Returns the venv's python.
    """
    python = path / "bin" / "python"
    marker = path / MARKER
    wanted = json.dumps(steps)
    if marker.exists() and marker.read_text() == wanted and python.exists():
        return python
    log(f"building {path.name} (one-off)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    for args in steps:
        done = subprocess.run([str(python), "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", *args],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise RuntimeError(f"pip install {' '.join(args)} failed in {path}")
    marker.write_text(wanted)
    return python
