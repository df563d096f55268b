"""Build the offline demo model and stream a real generation through ``python -P -m bridge``.

Every line sent to the worker is shown with ``>>>`` and every line it writes
back is shown as-is, so this doubles as a picture of the protocol.

    python examples/demo.py [MODEL_DIR]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# -P (3.11+): the working directory is not put on the import path, so no
# bridge.py or protocol.py lying there can stand in for the worker's modules.
PYTHON = [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else [])]


def main() -> int:
    model_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / ".demo-model")
    subprocess.run([*PYTHON, "-m", "bridge.demo_model", str(model_dir)], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with subprocess.Popen(
        [*PYTHON, "-m", "bridge"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    ) as worker:
        assert worker.stdin is not None and worker.stdout is not None

        def send(request: dict[str, Any]) -> None:
            line = json.dumps(request)
            sys.stdout.write(f">>> {line}\n")
            assert worker.stdin is not None
            worker.stdin.write(line.encode() + b"\n")
            worker.stdin.flush()

        def until_terminal() -> dict[str, Any]:
            assert worker.stdout is not None
            while True:
                raw = worker.stdout.readline()
                if not raw:
                    raise SystemExit("worker exited early")
                sys.stdout.write(raw.decode())
                sys.stdout.flush()
                reply: dict[str, Any] = json.loads(raw)
                if reply["type"] != "token":
                    return reply

        send({"cmd": "hello", "id": 1})
        until_terminal()
        send({"cmd": "load", "id": 2, "path": str(model_dir)})
        if until_terminal()["type"] == "error":
            return 1
        send({"cmd": "generate", "id": 3, "prompt": "def fibonacci(n):", "max_tokens": 24})
        until_terminal()
        messages = [{"role": "user", "content": "Name a Python module."}]
        send({"cmd": "chat", "id": 4, "messages": messages, "max_tokens": 12, "stop": ["\n"]})
        until_terminal()
        send({"cmd": "quit", "id": 5})
        until_terminal()
        return worker.wait(10)


if __name__ == "__main__":
    raise SystemExit(main())
