"""In a container, a worker that dies stops the whole server, so that the orchestrator replaces the container.

BentoML's supervisor (circus, inside `bentoml serve`) restarts a worker that dies, except in a container: BentoML 1.4
makes its watchers with `respawn=not running_inside_container()` (bentoml/serving.py `create_watcher`; "in a
container" is BENTOML_CONTAINERIZED, which BentoML's own Dockerfile sets, or BENTOCLOUD_DEPLOYMENT_URL), and leaves
restarts to the orchestrator. But the orchestrator sees only the container: with one of two workers killed (SIGKILL,
the OOM killer, a crash in native code), the other still answers /livez and /readyz, and the pod served at half
capacity for ever (the dead worker stayed a zombie; nothing restarted it).

So, in a container, each worker looks at its siblings (the other children of its parent, `bentoml serve`) every
CHECK_S: when one it saw running is gone, or a zombie, it sends the parent SIGTERM, as `stop_the_server` does for a
model that cannot be served. BentoML then stops the surviving workers the usual way (each drains: requests in flight
are answered, the listen queue is served, then the socket refuses), `bentoml serve` exits and the container with it;
Kubernetes restarts it (a Deployment's restartPolicy is Always), as would `podman run --restart` or Docker's.

Why the container exits rather than failing its liveness probe: exiting needs no probe at all (a bare `docker run
--restart`, a systemd unit, any orchestrator), it is seen within CHECK_S instead of the probe's period times its
failure threshold (30 s with deploy/k8s.yaml's 10 s x 3), and it drains like any other stop; a failing /livez would
end in the same SIGTERM, only later, and meanwhile the pod would keep its readiness on half its workers.

Outside a container nothing here runs: BentoML respawns the worker, as before. With one worker there is no sibling
to notice; a dead sole worker leaves the socket to no one, and the liveness probe, unanswered, is what catches it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

from bentoml.serving import running_inside_container

log = logging.getLogger(__name__)

CHECK_S = 1.0  # how often a worker looks at its siblings: one scan of /proc, a few hundred microseconds
PROC = Path("/proc")
DEAD_STATES = ("Z", "X")  # zombie (exited, not reaped by the supervisor), dead


def children(parent: int, proc: Path = PROC) -> dict[int, str]:
    """{pid: state} of `parent`'s child processes (state: /proc's one letter, R, S, Z...); Linux's /proc."""
    found = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after its last ")".
        state, ppid = stat[stat.rindex(")") + 2 :].split(" ", 2)[:2]
        if int(ppid) == parent:
            found[int(entry.name)] = state
    return found


def dead_siblings(seen: set[int], now: Mapping[int, str]) -> set[int]:
    """Siblings that died: those `seen` running before that are no longer children (reaped), and children that
    are zombies now (exited, not reaped: BentoML's supervisor leaves a worker it does not respawn so)."""
    return (seen - now.keys()) | {pid for pid, state in now.items() if state in DEAD_STATES}


def running(now: Mapping[int, str]) -> set[int]:
    return {pid for pid, state in now.items() if state not in DEAD_STATES}


def server_stopping() -> Callable[[], bool]:
    """Whether this worker's own server is stopping. At a normal stop every worker gets SIGTERM and its siblings
    exit one after another: that is no death to report. While uvicorn's Server serves, its `handle_exit` is the
    SIGTERM handler (`Server.capture_signals`) and sets `should_exit`; read here, never changed."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return lambda: bool(getattr(server, "should_exit", False))


async def watch(parent: int, stopping: Callable[[], bool], proc: Path = PROC, every_s: float = CHECK_S) -> int:
    """Look at `parent`'s children every `every_s`; when a sibling dies (and this server is not `stopping`), send
    `parent` SIGTERM and return the dead sibling's pid. Returns 0 if the parent goes first (the kernel then stops
    this worker: patches.exit_with_parent)."""
    me = os.getpid()
    seen: set[int] = set()
    while True:
        if os.getppid() != parent:
            return 0
        now = children(parent, proc)
        now.pop(me, None)
        dead = dead_siblings(seen, now)
        if dead and not stopping():
            pid = min(dead)
            log.critical(
                "worker process %d died and BentoML does not restart workers in a container: stopping bentoml serve "
                "(pid %d) so that the orchestrator replaces the container",
                pid, parent,
            )  # fmt: skip
            os.kill(parent, signal.SIGTERM)
            return pid
        seen |= running(now)
        await asyncio.sleep(every_s)


def start(loop: asyncio.AbstractEventLoop, workers: int, worker_index: int | None) -> asyncio.Task | None:
    """The watch as a task of this worker's loop, when it is a serving worker (`worker_index` set) with siblings, in
    a container as BentoML sees it; else None (BentoML respawns a dead worker itself)."""
    if worker_index is None or workers < 2 or not running_inside_container():
        return None
    return loop.create_task(watch(os.getppid(), server_stopping()))
