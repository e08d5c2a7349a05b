"""The Python behind flow.yaml: pipecat direct functions (first parameter `flow_manager`, described by
their docstrings, returning `(result, TRANSITION_IN_YAML)`), a `function` action, and the Python tool
`find_patient` that flow.yaml declares under tools:.

Records are a small table here; the intake is written to `intake.jsonl` beside this file when
INTAKE_LOG names a folder (the tests read it)."""

import json
import os
from pathlib import Path

from pipecat.flows import TRANSITION_IN_YAML, FlowManager

PATIENTS = {"1984-03-07": {"name": "Ada Lovelace", "last_name": "Lovelace"}}


def find_patient(birthday: str, last_name: str | None = None) -> dict:
    """A tool declared under tools: in flow.yaml: takes its arguments by name and returns fields."""
    record = PATIENTS.get(birthday)
    if record is None or (last_name and last_name.lower() != record["last_name"].lower()):
        return {"found": False, "name": ""}
    return {"found": True, "name": record["name"]}


async def record_medications(flow_manager: FlowManager, medications: list[str]):
    """Record the medications the patient takes now.

    Args:
        medications: Each medication, with its dose if the patient said it.
    """
    flow_manager.state["medications"] = medications
    return {"recorded": len(medications)}, TRANSITION_IN_YAML


async def record_allergies(flow_manager: FlowManager, allergies: list[str] | None = None):
    """Record the patient's allergies.

    Args:
        allergies: Each allergy; leave out when the patient has none.
    """
    flow_manager.state["allergies"] = allergies or []
    return {"recorded": len(allergies or [])}, TRANSITION_IN_YAML


async def record_visit_reason(flow_manager: FlowManager, reason: str):
    """Record why the patient is coming in.

    Args:
        reason: The reason, in the patient's words.
    """
    flow_manager.state["visit_reason"] = reason
    return {"recorded": True}, TRANSITION_IN_YAML


async def file_intake(action: dict, flow_manager: FlowManager) -> None:
    """A `function` action: files what was collected once the closing words have been said."""
    folder = os.environ.get("INTAKE_LOG")
    if folder:
        state = flow_manager.state
        entry = {key: state.get(key) for key in ("patient", "medications", "allergies", "visit_reason", "caller_number")}
        with (Path(folder) / "intake.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
