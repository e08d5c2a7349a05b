"""The voice library: one folder per voice under a root folder.

    library = VoiceLibrary(default_library())          # --library DIR, else $CHROMA_AGENTS_VOICES, else
                                                       # $XDG_DATA_HOME/chroma-agents/voices (~/.local/share/...)
    library.add("ava", audio="ava.mp3", transcript="...", consent_by="Ava Smith", consent_use="...")
    library.load("ava"); library.entries(); library.remove("ava")
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .profile import NAME, NAME_RULE, PROFILE_FILE, Voice, VoiceError, VoiceProfile, load_voice, write_profile
from .validate import prepare_audio, write_reference

ENV = "CHROMA_AGENTS_VOICES"
REFERENCE_FILE = "reference.wav"
DEFAULT_USE = "spoken by voice agents run with chroma-agents"


def default_library() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "chroma-agents" / "voices"


class LibraryError(ValueError):
    """A request the library cannot carry out (unknown name, name taken, bad name)."""


@dataclass
class Entry:
    """One row of `voice list`."""

    name: str
    seconds: float | None
    loudness: float | None  # LUFS of the stored recording
    problems: list[str]

    @property
    def status(self) -> str:
        if not self.problems:
            return "ok"
        return f"{len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}"


def voice_path(ref: str, base: Path | None = None) -> Path | None:
    """The absolute folder a voice reference written as a path means (relative to `base`), or None
    when it is a library name."""
    if "/" in ref or "\\" in ref or ref.startswith((".", "~")):
        return ((base or Path.cwd()) / Path(ref).expanduser()).resolve()
    return None


class VoiceLibrary:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_library()

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # a hidden folder is an `add` still being written
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / PROFILE_FILE).is_file())

    def folder(self, name: str) -> Path:
        _check_name(name)
        folder = self.root / name
        if not (folder / PROFILE_FILE).is_file():
            known = ", ".join(self.names()) or "none yet"
            raise LibraryError(f"no voice {name!r} in the library at {self.root} (voices there: {known}); "
                               "add one with `chroma-agent voice add`")
        return folder

    def load(self, name: str) -> Voice:
        return load_voice(self.folder(name))

    def resolve(self, ref: str, base: Path | None = None) -> Path:
        """The folder a voice reference means: a path (it has a '/' or starts with '.' or '~'), relative
        to `base`, or else a name in this library."""
        folder = voice_path(ref, base)
        if folder is not None:
            if not folder.is_dir():
                raise LibraryError(f"{ref!r} is not a folder (looked for {folder}); expected a voice folder "
                                   f"holding {PROFILE_FILE}")
            return folder
        return self.folder(ref)

    def add(
        self,
        name: str,
        *,
        audio: str | Path,
        transcript: str,
        consent_by: str,
        consent_use: str = DEFAULT_USE,
        consent_date: dt.date | None = None,
        synthetic: bool = False,
        language: str = "en",
        replace: bool = False,
    ) -> Voice:
        """Check the recording, store it normalised as 24 kHz mono with its voice.yaml; nothing is
        written unless every check passes."""
        _check_name(name)
        target = self.root / name
        if target.exists() and not replace:
            raise LibraryError(f"a voice {name!r} is already in the library at {target}; remove it first or "
                               "replace it (--replace)")
        audio = Path(audio).expanduser()
        prepared = prepare_audio(audio, transcript)
        if prepared.problems:
            raise VoiceError([f"{audio}: {problem}" for problem in prepared.problems])
        try:
            profile = VoiceProfile(
                name=name, language=language, transcript=transcript.strip(), audio=REFERENCE_FILE,
                consent={"given_by": consent_by, "date": consent_date or dt.date.today(), "use": consent_use,
                         "synthetic": synthetic},
                source={"file": audio.name, "sample_rate": prepared.source_rate, "channels": prepared.channels,
                        "loudness_lufs": None if prepared.loudness is None else round(prepared.loudness, 1)},
            )
        except ValidationError as exc:
            raise VoiceError([f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            write_reference(staging / REFERENCE_FILE, prepared.audio)
            write_profile(staging / PROFILE_FILE, profile)
            voice = load_voice(staging)  # what is stored must load as it will later
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)  # the voice appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        voice.folder = target
        voice.prepared.notes = prepared.notes  # what happened to the recording as given
        return voice

    def entries(self) -> list[Entry]:
        rows = []
        for name in self.names():
            try:
                voice = load_voice(self.root / name)
                rows.append(Entry(name, voice.seconds, voice.prepared.loudness, []))
            except VoiceError as exc:
                rows.append(Entry(name, None, None, exc.problems))
        return rows

    def remove(self, name: str) -> Path:
        folder = self.folder(name)
        shutil.rmtree(folder)
        return folder


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise LibraryError(f"{name!r} is not a voice name; expected {NAME_RULE}")
