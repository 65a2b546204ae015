"""Run one ClientApp task with this hospital's own installed code, for an approved app only.

Flower's ClientApp runtime installs the FAB the server sent and runs *its*
``client.app``: whoever can start a run chooses the code that executes next
to the hospital's data.  Here the hospital runs the ClientApp of its own
installation (the code it reviewed and installed), and only for a run
whose FAB has the app digest the hospital approved (``common/appdigest.py``;
by default the digest of its own installation, so server and hospital must
run the same release).  Any other run gets an error reply saying why
(``INVALID_FAB``) and nothing of it executes; the site's log says the same.
Flower's own FAB signatures ("trusted entities") need a licensed SuperLink,
hence this check.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from common.objectpull import PULL_BACKOFF_CAP_S, PULL_BACKOFF_S

log = logging.getLogger("flower-client.approval")
DIGEST = re.compile(r"[0-9a-f]{64}")


def refusal(fab_content: bytes, approved: str) -> str:
    """Why a run's FAB must not run here ('' when it is the approved app)."""
    from common.appdigest import AppDigestError, fab_digest

    try:
        digest = fab_digest(fab_content)
    except AppDigestError as exc:
        return f"app not approved at this site: {exc}"
    if digest != approved:
        return (
            f"app not approved at this site: the run's app digest is {digest}, the site approved {approved}"
        )
    return ""


# The SuperNode hands out a task while it still downloads the message from the SuperLink; Flower's
# own pull then retries after 1, 2, 4 ... s (3 s lost on a 43 MiB model on loopback).  Retry sooner
# (common.objectpull: the same for the SuperNode's and the ServerApp's pulls).


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input`` (message, context, run, FAB), retrying unavailable objects sooner."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("no message for this task from the SuperNode's runtime API")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
        initial_backoff=PULL_BACKOFF_S,
        backoff_cap=PULL_BACKOFF_CAP_S,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower: a deflated message lacks its own id
    return message, context, run, fab


def run_task(runtime_api_address: str, token: str, approved: str) -> int:
    """Pull one task from the SuperNode's runtime API, check its app, run the installed ClientApp, reply.

    Mirrors Flower's ``run_clientapp`` (heartbeat, reply, task status) without
    installing or importing anything from the FAB.  Returns the exit code.
    """
    from flwr.app import Context, Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    retry = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,  # the SuperNode's runtime API, on loopback
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    sub_status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    t0 = time.perf_counter()
    t_pulled = t_ran = t0
    try:
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        t_pulled = time.perf_counter()
        reason = refusal(fab.content, approved)
        if reason:
            log.error("run %d refused: %s", context.run_id, reason)
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
            details = reason
        else:
            from client.app import app  # this installation's ClientApp, never the FAB's copy

            reply = app(message=message, context=context)
            sub_status, details, code = SubStatus.COMPLETED, "", 0
        t_ran = time.perf_counter()
    except Exception as exc:
        log.exception("ClientApp task failed")
        if message is not None:
            reason = f"{type(exc).__name__} in the ClientApp"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception:
            log.exception("could not push the reply")
            code = 1
        retry.max_tries = 1
        push_task_output(client, context, sub_status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    log.info(
        "%s message in process %d: pulled %.2f s, ran %.2f s, replied %.2f s",
        message.metadata.message_type if message is not None else "no",
        os.getpid(),
        t_pulled - t0,
        t_ran - t_pulled,
        time.perf_counter() - t_ran,
    )
    return code
