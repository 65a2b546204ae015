"""A hospital's SuperExec that imports the heavy libraries once and forks a process per message.

Flower's own SuperExec (``flower-superexec``, started by ``flower-supernode
--isolation subprocess``) launches a fresh ``flwr-clientapp`` interpreter for
every message, and each one imports torch, MONAI and Opacus again: 5-10 s
of CPU per message on 2 cores, for a site that gets 2 messages per round
and about 6 more for the plan's evaluation.  This one runs beside
``flower-supernode --isolation process``: it imports those libraries once,
asks the SuperNode's runtime API for tasks, and for each task forks a child
that checks the run's app against the digest the hospital approved and runs
this installation's ClientApp (``client/approval.py``: never the code the
server sent), replies and exits.  Isolation stays Flower's: one process per
message, nothing kept between messages: the parent never runs a task, so
each child starts from the same freshly imported modules, copy-on-write.
Those are the third-party libraries and this installation's ClientApp
(``client.app``), imported when ``flower-client run`` starts, just after
it computed the app digest it approves: the code that digest describes.

It lives as long as the hospital's ``flower-client run``, not as long as one
SuperNode: when the server stops or restarts, ``flower-client`` starts a new
SuperNode on the same runtime API port and this process serves it without
importing anything again, so a hospital that stays connected pays the imports
once, not once per run.

``python -m client.warm --runtime-api-address HOST:PORT --parent-pid PID --approved-app DIGEST``
(``flower-client run`` starts it); it exits when that process (``flower-client``) does.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
import time
from collections.abc import Sequence

from common.heap import imports_frozen, preload

log = logging.getLogger("flower-client.warm")

# Third-party libraries the ClientApp needs.
PRELOAD = (
    "torch",
    "torch._dynamo",  # torch.optim imports it on an optimizer's first use: 1.2 s in every training message otherwise
    "monai.networks.nets",
    "monai.transforms",
    "opacus",
    "nibabel",
    "scipy.ndimage",
    "sklearn.linear_model",
    "sklearn.model_selection",
    "flwr.supernode.runtime.run_clientapp",
)
CLIENT_APP = "client.app"  # this installation's ClientApp: 0.3 s per message otherwise, on these cores


def preload_client_app(module: str = CLIENT_APP) -> bool:
    """Import the ClientApp; if it does not import, say so once and leave each task to report it."""
    try:
        importlib.import_module(module)
    except Exception:
        log.exception("%s does not import: every task of this site will fail until it is fixed", module)
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(children: set[int]) -> None:
    """Collect the exit status of finished children (no zombies); log failures."""
    for pid in list(children):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                log.warning("ClientApp process %d exited with %d", pid, code)


def wait_for_exit(children: set[int], timeout_s: float) -> None:
    """Until one of ``children`` exits or ``timeout_s`` passes (a plain sleep where Linux's pidfd is missing)."""
    fds: list[int] = []
    try:
        if hasattr(os, "pidfd_open"):
            for pid in children:
                try:
                    fds.append(os.pidfd_open(pid))
                except ProcessLookupError:  # already exited: the caller reaps it now
                    return
        if fds:
            select.select(fds, [], [], timeout_s)
        else:
            time.sleep(timeout_s)
    finally:
        for fd in fds:
            os.close(fd)


def run_task(runtime_api_address: str, token: str, approved: str) -> int:
    """In a forked child: run one task, approved app only (``client/approval.py``); never returns (``os._exit``)."""
    code = 1
    try:
        from .approval import run_task as run_approved

        code = run_approved(runtime_api_address, token, approved)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        log.exception("ClientApp task failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit handlers and the interpreter teardown


def serve(
    runtime_api_address: str, parent_pid: int, approved: str, poll_s: float = 0.1, busy_poll_s: float = 1.0
) -> int:
    """Acquire tasks from whichever SuperNode serves the runtime API; fork one child per task until ``parent_pid`` exits.

    Idle, it asks every ``poll_s``.  While a child works it asks only every ``busy_poll_s`` or when a
    child exits: Flower's SuperNode hands out one message at a time and pulls the next only after
    the reply, so no task can come meanwhile, and each request costs both processes CPU that the
    training needs (three SuperNodes answering 30 requests a second took 0.12 of the two cores
    while their sites trained, 0.03 with this wait; bench deployment, 2026-12-02).
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    children: set[int] = set()
    tasks = 0
    try:
        while _alive(parent_pid):
            reap(children)
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except Exception as exc:  # the SuperNode is starting or restarting (server down): check again
                log.debug("runtime API not ready: %s", exc)
                time.sleep(max(poll_s, 0.5))
                continue
            if res.HasField("task") and res.token:
                pid = os.fork()
                if pid == 0:
                    run_task(runtime_api_address, res.token, approved)
                children.add(pid)
                tasks += 1
                log.info("task %d: ClientApp process %d", res.task.task_id, pid)
                continue
            if children:
                wait_for_exit(children, busy_poll_s)
            else:
                time.sleep(poll_s)
    finally:
        client.close()
        deadline = time.monotonic() + 10
        while children and time.monotonic() < deadline:
            reap(children)
            time.sleep(0.1)
    log.info("flower-client %d gone: %d task(s) served", parent_pid, tasks)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.warm", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's runtime API, HOST:PORT")
    p.add_argument("--parent-pid", type=int, required=True, help="exit when this process (flower-client run) is gone")
    p.add_argument("--approved-app", required=True, help="the app digest this site runs (common/appdigest.py)")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between task requests when idle")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    t0 = time.perf_counter()
    with imports_frozen():  # each forked child's collections then skip (and leave unshared) the imported heap
        preload(PRELOAD)
        app = "this installation's ClientApp" if preload_client_app() else "not the ClientApp (see the error above)"
    log.info("preloaded %d libraries and %s in %.1f s", len(PRELOAD), app, time.perf_counter() - t0)
    log.info("approved app digest %s: other runs are refused", args.approved_app)
    return serve(args.runtime_api_address, args.parent_pid, args.approved_app, args.poll)


if __name__ == "__main__":
    sys.exit(main())
