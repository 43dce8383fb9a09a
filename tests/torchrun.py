"""Run a test file as a multi-process job under torchrun: CPU processes joined by gloo, one
thread each. The file's `__main__` block is the training process of every rank."""

import os
import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(script: str, world: int, *args: str, timeout: float = 240) -> None:
    """`world` ranks of `script args` on this machine; fails with the ranks' output tails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), script, *args]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
