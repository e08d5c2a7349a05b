"""The Python behind flow.yaml, in pipecat's shape: each tool is a direct function whose first
parameter is `flow_manager` and whose docstring describes it to the model; it keeps what it learns in
`flow_manager.state` and returns `(result, TRANSITION_IN_YAML)` so the flow file picks the next node.

Bookings are kept in memory and written to `bookings.jsonl` beside this file when RESTAURANT_LOG is
set (the tests read it)."""

import json
import os
from pathlib import Path

from pipecat.flows import TRANSITION_IN_YAML, FlowManager

MAX_PARTY = 12
FREE_TIMES = {"6pm", "7pm", "8:30pm"}


def _log(event: str, **fields) -> None:
    folder = os.environ.get("RESTAURANT_LOG")
    if folder:
        with (Path(folder) / "bookings.jsonl").open("a") as f:
            f.write(json.dumps({"event": event, **fields}) + "\n")


async def collect_party_size(flow_manager: FlowManager, size: int):
    """Record how many people the table is for.

    Args:
        size: Number of people, children included.
    """
    flow_manager.state["party_size"] = size
    status = "ok" if 0 < size <= MAX_PARTY else "too_large"
    return {"status": status, "size": size}, TRANSITION_IN_YAML


async def check_availability(flow_manager: FlowManager, time: str, seating: str | None = None):
    """Check whether a table is free at a time.

    Args:
        time: The time asked for, like 7pm.
        seating: inside or terrace; leave out if the caller has no preference.
    """
    available = time.replace(" ", "").lower() in FREE_TIMES
    if available:
        flow_manager.state["reservation"] = {"time": time, "seating": seating or "inside"}
    return {"available": available, "time": time}, TRANSITION_IN_YAML


async def confirm_reservation(flow_manager: FlowManager, name: str):
    """Book the table under the caller's name.

    Args:
        name: The name the booking is under.
    """
    flow_manager.state["reservation"]["name"] = name
    return {"booked": True, "name": name}, TRANSITION_IN_YAML


async def save_reservation(action: dict, flow_manager: FlowManager) -> None:
    """A `function` action: runs inline, after what the caller was told before it."""
    _log("saved", caller=flow_manager.state.get("caller_number", ""), **flow_manager.state["reservation"])


async def print_ticket(action: dict, flow_manager: FlowManager) -> None:
    """A custom action whose handler the flow file names."""
    _log("ticket", copies=action["copies"], name=flow_manager.state["reservation"]["name"])


async def notify_host(action: dict, flow_manager: FlowManager) -> None:
    """A custom action registered in code, as a pipecat bot registers one on its FlowManager."""
    _log("host_notified", channel=action["channel"], party_size=flow_manager.state["party_size"])


def register_actions(flow_manager: FlowManager) -> None:
    flow_manager.register_action("notify_host", notify_host)
