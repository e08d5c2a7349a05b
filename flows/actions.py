"""Telephony actions a flow node can run before or after the model speaks, and `CallControl`, the
interface the call side implements to carry them out.

    pre_actions:
      - type: say
        text: "Thanks, {{ caller.first_name }}. Let me check that order."
    post_actions:
      - type: transfer_call
        to: "+15551234567"          # E.164, or sip:agent@pbx.example.com
      - type: send_dtmf
        digits: "1234#"
      - type: play
        wav: audio/hold.wav         # relative to the flow file
      - type: end_call              # hang up once the current sentence has been spoken

They are custom action types in pipecat's flow format, so `FlowManager` runs them as it runs any
action; each is handed the call's `CallControl`. pipecat's own actions are taken as pipecat has them:
`tts_say` is spoken through the model as `say` is (there is no separate TTS service),
`end_conversation` speaks its optional text and hangs up, `function` runs the named handler from the
handlers module inline in the pipeline, and a custom type names its `handler:` or is registered by the
handlers module (`flows.handlers`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from loguru import logger
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from processors.audio_io import AudioFileError, read_audio_native
from transports.addresses import E164, SIP_URI

from .handlers import Handlers
from .problems import Problem, from_validation, show
from .templates import MissingValue, render

DTMF_DIGITS = re.compile(r"^[0-9*#A-Da-d]{1,32}$")


@runtime_checkable
class CallControl(Protocol):
    """What a flow can ask of the call it runs in. The call side (transport plus engine) implements it
    once per call; every method returns once the request is accepted, not when it has played out."""

    async def hang_up(self, after_current_sentence: bool = True) -> None:
        """End the call, at once or once the sentence being spoken is finished."""

    async def transfer(self, target: str) -> None:
        """Hand the caller to an E.164 number (`+15551234567`) or a SIP URI, through the transport."""

    async def send_dtmf(self, digits: str) -> None:
        """Send DTMF tones (0-9, *, #, A-D) to the far end."""

    async def play(self, wav_path: Path) -> None:
        """Play an audio file (absolute path; WAV, FLAC, OGG or MP3, any rate) to the caller."""

    async def say(self, text: str) -> None:
        """Speak fixed text in the agent's current voice, through the model's own speech path."""

    async def set_voice(self, name: str) -> None:
        """Speak from now on in the named voice from the voice library."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndCallArgs(_Args):
    after_current_sentence: StrictBool = True


class TransferCallArgs(_Args):
    to: StrictStr

    @field_validator("to")
    @classmethod
    def _target(cls, value: str) -> str:
        if not (E164.match(value) or SIP_URI.match(value)):
            raise ValueError(
                "an E.164 number like '+15551234567' or a SIP URI like 'sip:agent@pbx.example.com'"
            )
        return value


class SendDtmfArgs(_Args):
    digits: StrictStr

    @field_validator("digits")
    @classmethod
    def _digits(cls, value: str) -> str:
        if not DTMF_DIGITS.match(value):
            raise ValueError("1 to 32 DTMF digits: 0-9, *, #, A-D")
        return value


class PlayArgs(_Args):
    wav: Path

    @field_validator("wav")
    @classmethod
    def _wav(cls, value: Path, info: ValidationInfo) -> Path:
        path = ((info.context or {}).get("base", Path.cwd()) / value.expanduser()).resolve()
        if not path.is_file():
            raise ValueError(f"an existing audio file (looked for {path})")
        try:
            read_audio_native(path)  # read whole at load time: a bad file fails the flow, not a call
        except AudioFileError as exc:
            raise ValueError(f"a readable audio file ({exc})") from None
        return path


class SayArgs(_Args):
    text: StrictStr

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the text to speak")
        return value


class TtsSayArgs(SayArgs):
    # pipecat passes any further keys of its actions through, so a file may carry some
    model_config = ConfigDict(extra="allow", frozen=True)

    append_text_to_context: StrictBool = True


class EndConversationArgs(_Args):
    model_config = ConfigDict(extra="allow", frozen=True)

    text: StrictStr | None = None
    append_text_to_context: StrictBool = True


ACTION_ARGS: dict[str, type[_Args]] = {
    "end_call": EndCallArgs,
    "transfer_call": TransferCallArgs,
    "send_dtmf": SendDtmfArgs,
    "play": PlayArgs,
    "say": SayArgs,
}
TELEPHONY_ACTIONS = tuple(ACTION_ARGS)  # this project's own action types; pipecat alone cannot run them
PIPECAT_ACTIONS = ("tts_say", "end_conversation", "function")  # built into pipecat's FlowManager
PIPECAT_ARGS: dict[str, type[_Args]] = {"tts_say": TtsSayArgs, "end_conversation": EndConversationArgs}


def check_action(
    action: Any, base: Path, handlers: Handlers | None = None
) -> tuple[dict[str, Any] | None, list[Problem]]:
    """An action from the file as pipecat's action dict with its arguments checked (paths made
    absolute), or the problems with it, located inside the action. `handlers` is the flow's handlers
    module: what `function` and custom actions name, and the custom types it registers."""
    if not isinstance(action, dict):
        return None, [((), f"{show(action)} is not allowed; expected a mapping with type and its arguments")]
    kind = action.get("type")
    if kind in ACTION_ARGS:
        if "handler" in action:
            return None, [(("handler",), "unknown key; telephony actions are carried out by the call itself")]
        args = {k: v for k, v in action.items() if k != "type"}
        try:
            checked = ACTION_ARGS[kind].model_validate(args, context={"base": base})
        except ValidationError as exc:
            return None, from_validation(exc)
        return {"type": kind, **{k: str(v) if isinstance(v, Path) else v for k, v in checked}}, []
    if kind in PIPECAT_ARGS:
        if "handler" in action:
            return None, [(("handler",), f"unknown key; pipecat's built-in {kind!r} action takes no handler")]
        try:
            PIPECAT_ARGS[kind].model_validate({k: v for k, v in action.items() if k != "type"})
        except ValidationError as exc:
            return None, from_validation(exc)
        return dict(action), []
    if not isinstance(kind, str) or not kind:
        return None, [(("type",), f"{show(kind)} is not allowed; expected {_expected_types(handlers)}")]
    handler = action.get("handler")
    if handler is None:
        if kind == "function":
            return None, [(("handler",), "missing; a function action names its handler in the handlers module")]
        if handlers is not None and kind in handlers.actions:
            return dict(action), []
        return None, [(("type",), f"{kind!r} is not allowed; expected {_expected_types(handlers)}")]
    if not isinstance(handler, str):
        return None, [(("handler",), f"{show(handler)} is not allowed; expected the name of a handler")]
    if handlers is None:
        return None, [
            (
                ("handler",),
                f"{handler!r} cannot be found: there is no handlers module (give handlers: in the agent "
                "file, flow check --handlers, or a handlers.py beside the flow file)",
            )
        ]
    if handlers.lookup(handler) is None:
        return None, [(("handler",), f"{handler!r} is not a function in the handlers module {handlers.where}")]
    return dict(action), []


def _expected_types(handlers: Handlers | None) -> str:
    custom = sorted(handlers.actions) if handlers is not None else []
    kinds = ", ".join([*PIPECAT_ACTIONS, *TELEPHONY_ACTIONS, *custom])
    return (
        f"one of {kinds}, or a custom type with handler: naming a function in the handlers module "
        "(or registered by its register_actions)"
    )


ActionHandler = Callable[[dict[str, Any], Any], Awaitable[None]]


def action_handlers(control: CallControl) -> dict[str, ActionHandler]:
    """One pipecat action handler per telephony action, all acting on `control`.

    pipecat registers a handler per action type on first use, so a handler reads what to do from the
    action dict it is given, never from the node it was built for.
    """

    async def end_call(action: dict, flow_manager: Any) -> None:
        await _guard(action, control.hang_up(action.get("after_current_sentence", True)))

    async def transfer_call(action: dict, flow_manager: Any) -> None:
        await _guard(action, control.transfer(action["to"]))

    async def send_dtmf(action: dict, flow_manager: Any) -> None:
        await _guard(action, control.send_dtmf(action["digits"]))

    async def play(action: dict, flow_manager: Any) -> None:
        await _guard(action, control.play(Path(action["wav"])))

    async def say(action: dict, flow_manager: Any) -> None:
        try:
            text = render(action["text"], flow_manager.state)
        except MissingValue as exc:
            logger.error(f"flow action say: {{{{ {exc.path} }}}} has no value yet; the text is not spoken")
            return
        await _guard(action, control.say(text))

    async def end_conversation(action: dict, flow_manager: Any) -> None:
        if action.get("text"):
            await _guard(action, control.say(action["text"]))
        await _guard(action, control.hang_up(True))

    return {
        "end_conversation": end_conversation,
        "end_call": end_call,
        "transfer_call": transfer_call,
        "send_dtmf": send_dtmf,
        "play": play,
        "say": say,
    }


async def _guard(action: dict, request: Awaitable[None]) -> None:
    # A failed action is logged, not raised: pipecat would abort the node transition it belongs to.
    try:
        await request
    except Exception:
        logger.exception(f"flow action {action['type']} failed")
