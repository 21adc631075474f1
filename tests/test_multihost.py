"""A multi-host run on one machine: two processes on 127.0.0.1 with two CPU devices each, joined by
`jax.distributed` (CPU collectives over gloo), run one engine at tensor_parallel_size=4. Process 0
schedules and process 1 follows its steps; the tokens must be those of one process on one device."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infercept_jax.cli import main
from infercept_jax.parallel import initialize_distributed

TESTS = Path(__file__).parent
WORKER_TIMEOUT_S = 600


def free_port() -> int:
    """A port nothing listens on now; the coordinator binds it a moment later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_code(worker: subprocess.Popen, deadline: float) -> int | str:
    """The worker's exit code, or why there is none."""
    try:
        return worker.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return "still running at the deadline"


def test_two_processes_give_the_tokens_of_one_device_through_swaps(tmp_path):
    from helpers import paused_run
    from multihost_worker import PROMPTS, build_llm, greedy_with_pauses

    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
               JAX_NUM_PROCESSES="2", PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2")
    command = [sys.executable, str(TESTS / "multihost_worker.py")]
    logs = [tmp_path / f"process-{i}.log" for i in (0, 1)]
    workers = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                workers.append(subprocess.Popen(command, cwd=TESTS.parent, env=dict(env, JAX_PROCESS_ID=str(i)),
                                                stdout=out, stderr=subprocess.STDOUT))
        one_device = paused_run(build_llm(1), PROMPTS, greedy_with_pauses())   # while the workers start
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        codes = [exit_code(w, deadline) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n\n".join(text[-4000:] for text in texts)
    driver, follower = (json.loads(text.strip().splitlines()[-1]) for text in texts)
    assert driver["tokens"] == one_device
    assert driver["swap_out_blocks"] > 0 and driver["swap_in_blocks"] > 0
    assert follower["steps"] == driver["steps"] > 0


@pytest.mark.parametrize("given, message", [
    (dict(coordinator_address="127.0.0.1:1234"), "also needs the number of processes"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "also needs the number of processes"),
    (dict(num_processes=2, process_id=0), "without a coordinator address"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "must be host:port"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
])
def test_half_given_settings_are_refused_before_joining(given, message, monkeypatch):
    clear_distributed_environment(monkeypatch)
    with pytest.raises(ValueError, match=message):
        initialize_distributed(**given)


def test_settings_come_from_the_environment(monkeypatch):
    clear_distributed_environment(monkeypatch)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        initialize_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="also needs the number of processes"):
        initialize_distributed()


def test_no_coordinator_means_one_process(monkeypatch):
    clear_distributed_environment(monkeypatch)
    assert initialize_distributed() is False


def clear_distributed_environment(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["serve"], ["profile"]], ids=lambda c: c[0])
def test_cli_refuses_half_given_distributed_flags(command, monkeypatch, capsys):
    clear_distributed_environment(monkeypatch)
    assert main(command + ["--num-processes", "2", "--process-id", "1"]) == 2
    assert "without a coordinator address" in capsys.readouterr().err
