"""A voice is a folder: `voice.yaml` and the reference recording it names.

    voice = load_voice("examples/voices/demo")     # VoiceError listing every problem if it is unusable
    voice.audio, voice.transcript                  # 24 kHz mono float32, and the words spoken in it
    voice.codes_for(model)                         # the recording's codec codes, cached beside it per model

voice.yaml:

    name: demo
    language: en
    transcript: Hello, thanks for calling.
    audio: reference.wav
    consent:                  # required: a voice without it does not load
      given_by: Jane Doe      # who agreed to their voice being cloned
      date: 2026-11-22        # when
      use: support line of Example Ltd   # for what
      synthetic: false        # true for a generated voice that is no one's

Problems are reported as `file:line: field: message`, all of them at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
)

from .validate import PreparedAudio, prepare_audio

PROFILE_FILE = "voice.yaml"
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
NAME_RULE = "1 to 64 lowercase letters, digits, '-' or '_', starting with a letter or digit"

Words = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class VoiceError(ValueError):
    """An unusable voice; str() is every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class ConsentRecord(BaseModel):
    """Who agreed to this voice being cloned, when, and for what."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    given_by: Words = Field(description="The person whose voice it is (or who holds the rights to it).")
    date: dt.date = Field(description="When consent was given (YYYY-MM-DD).")
    use: Words = Field(description="What the voice may be used for.")
    synthetic: StrictBool = Field(False, description="True for a generated voice that belongs to no one.")

    @field_validator("date")
    @classmethod
    def _not_in_future(cls, value: dt.date) -> dt.date:
        if value > dt.date.today() + dt.timedelta(days=1):  # a day of slack for time zones
            raise ValueError(f"{value} is in the future; expected the date consent was given")
        return value


class SourceInfo(BaseModel):
    """What the recording was before it was stored (written by `chroma-agent voice add`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    sample_rate: int
    channels: int
    loudness_lufs: float | None = None


class VoiceProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description=f"The voice's name in the library: {NAME_RULE}.")
    language: Words = Field("en", description="Language spoken in the reference (the model speaks English).")
    transcript: Words = Field(description="Exactly the words spoken in the reference recording.")
    audio: Words = Field(description="The reference recording, a file in this folder.")
    consent: ConsentRecord = Field(description="The consent record; required.")
    source: SourceInfo | None = Field(None, description="The recording as it was added.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r} is not a voice name; expected {NAME_RULE}")
        return value

    @field_validator("audio")
    @classmethod
    def _inside(cls, value: str) -> str:
        if Path(value).name != value:
            raise ValueError(f"{value!r} is a path; expected the name of a file in the voice's folder")
        return value


MISSING = {
    "consent": "missing; a voice loads only with a consent record: given_by (who), date (when) and use (for what)",
    "transcript": "missing; expected exactly the words spoken in the reference recording",
    "audio": "missing; expected the file name of the reference recording in this folder",
}


@dataclass(eq=False)
class Voice:
    """A loaded, validated voice: what an engine session speaks in."""

    folder: Path
    profile: VoiceProfile
    prepared: PreparedAudio

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def transcript(self) -> str:
        return self.profile.transcript

    @property
    def audio(self) -> np.ndarray:
        return self.prepared.audio

    @property
    def seconds(self) -> float:
        return self.prepared.seconds

    @cached_property
    def key(self) -> str:
        """Identifies the exact audio and transcript the prompt is built from."""
        digest = hashlib.sha256(np.ascontiguousarray(self.audio, dtype=np.float32).tobytes())
        digest.update(self.transcript.encode("utf-8"))
        return digest.hexdigest()

    def codes_for(self, model):
        """The reference's codec codes [frames, codebooks] for this model, from the cache beside the voice."""
        from .codes import voice_codes  # torch only when a model is in play

        return voice_codes(self, model)


def load_voice(folder: str | Path) -> Voice:
    """Read, check and prepare a voice folder; VoiceError names every problem."""
    folder = Path(folder).expanduser().resolve()
    path = folder / PROFILE_FILE
    if not folder.is_dir():
        raise VoiceError([f"{folder}: no such voice folder" if not folder.exists() else f"{folder}: not a folder"])
    if not path.is_file():
        raise VoiceError([f"{path}: no such file; a voice folder holds {PROFILE_FILE} and its reference recording"])
    profile, problems = read_profile(path)
    if profile is None:
        raise VoiceError(problems)
    audio_path = folder / profile.audio
    prepared = prepare_audio(audio_path, profile.transcript)
    problems += [f"{audio_path}: {problem}" for problem in prepared.problems]
    if problems:
        raise VoiceError(problems)
    return Voice(folder, profile, prepared)


def read_profile(path: Path) -> tuple[VoiceProfile | None, list[str]]:
    """The validated voice.yaml, or None and its problems."""
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        return None, [f"{path}: cannot be read ({exc}); expected a UTF-8 YAML file"]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        return None, [f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]
    if not isinstance(data, dict):
        return None, [f"{path}: expected a mapping with name, transcript, audio and consent"]
    try:
        return VoiceProfile.model_validate(data), []
    except ValidationError as exc:
        lines = _key_lines(node)
        return None, [_problem(path, lines, error) for error in exc.errors()]


def write_profile(path: Path, profile: VoiceProfile) -> None:
    data = profile.model_dump(mode="json", exclude_none=True)
    header = "# A cloned voice: the reference recording, its transcript and the consent to clone it.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")


def _problem(path: Path, lines: dict[tuple, int], error: dict[str, Any]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    field = ".".join(loc)
    if error["type"] == "missing":
        message = MISSING.get(field, "missing")
    elif error["type"] == "extra_forbidden":
        message = "unknown key; expected one of " + ", ".join(_known(loc[:-1]))
    elif error["type"] == "value_error":
        message = str(error["ctx"]["error"])
    else:
        message = f"{error['input']!r} is not allowed ({error['msg'][0].lower()}{error['msg'][1:]})"
    at = loc
    while at and at not in lines:
        at = at[:-1]
    return f"{path}:{lines.get(at, 1)}: {field}: {message}"


def _known(loc: tuple) -> list[str]:
    model: type[BaseModel] = VoiceProfile
    for part in loc:
        model = {"consent": ConsentRecord, "source": SourceInfo}.get(part, model)
    return list(model.model_fields)


def _key_lines(node: yaml.Node | None, loc: tuple = ()) -> dict[tuple, int]:
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                here = (*loc, key.value)
                lines[here] = key.start_mark.line + 1
                lines.update(_key_lines(value, here))
    return lines
