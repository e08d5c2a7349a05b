"""`chroma-agent voice add|list|check|remove`: the voice library from the command line.

`declare(subparsers, usage_error)` adds the `voice` command; problems the user can fix are raised as
`usage_error` (one line, exit 2), and `check` exits 1 when the voice has problems.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from .library import DEFAULT_USE, ENV, LibraryError, VoiceLibrary, default_library
from .profile import VoiceError, load_voice


def declare(subparsers, usage_error: type[Exception]) -> None:
    p = subparsers.add_parser("voice", help="manage cloned voices: add, list, check, remove")
    library = argparse.ArgumentParser(add_help=False)
    library.add_argument(
        "--library", type=Path, default=None, metavar="DIR",
        help=f"the voice library folder (default: ${ENV}, else {default_library()})",
    )
    actions = p.add_subparsers(dest="voice_command", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add", parents=[library], help="check a recording and add it to the library as a voice",
        description="Check a reference recording (WAV, FLAC, MP3 or OGG; 3 to 30 s of speech) and its "
        "transcript, and store it normalised (24 kHz mono, trimmed, -20 LUFS) with its consent record.",
    )
    add.add_argument("name", metavar="NAME", help="the voice's name: lowercase letters, digits, '-' and '_'")
    add.add_argument("--audio", required=True, metavar="FILE", help="the reference recording")
    add.add_argument("--transcript", required=True, metavar="TEXT", help="exactly the words spoken in it")
    add.add_argument("--consent-by", required=True, metavar="WHO", help="who consented to this voice being cloned")
    add.add_argument("--consent-use", default=DEFAULT_USE, metavar="TEXT",
                     help=f"what the voice may be used for (default: {DEFAULT_USE!r})")
    add.add_argument("--consent-date", default=None, metavar="YYYY-MM-DD", help="when consent was given (default: today)")
    add.add_argument("--synthetic", action="store_true", help="the voice is generated and belongs to no one")
    add.add_argument("--language", default="en", help="language of the recording (default: en)")
    add.add_argument("--replace", action="store_true", help="replace a voice of the same name")

    listing = actions.add_parser("list", parents=[library], help="the library's voices, with length, loudness and status")
    check = actions.add_parser(
        "check", parents=[library], help="check one voice (a name or a folder); exit 1 if it has problems"
    )
    check.add_argument("name", metavar="NAME|FOLDER", help="a voice in the library, or a voice folder")
    remove = actions.add_parser("remove", parents=[library], help="delete a voice from the library")
    remove.add_argument("name", metavar="NAME")

    def run(action):
        def wrapped(args: argparse.Namespace) -> int:
            try:
                return action(VoiceLibrary(args.library), args)
            except LibraryError as exc:
                raise usage_error(str(exc)) from None

        return wrapped

    add.set_defaults(run=run(lambda lib, args: _add(lib, args, usage_error)))
    listing.set_defaults(run=run(_list))
    check.set_defaults(run=run(_check))
    remove.set_defaults(run=run(_remove))


def _add(library: VoiceLibrary, args: argparse.Namespace, usage_error) -> int:
    date = None
    if args.consent_date is not None:
        try:
            date = dt.date.fromisoformat(args.consent_date)
        except ValueError:
            raise usage_error(f"--consent-date is {args.consent_date!r}, expected a date as YYYY-MM-DD") from None
    try:
        voice = library.add(
            args.name, audio=args.audio, transcript=args.transcript, consent_by=args.consent_by,
            consent_use=args.consent_use, consent_date=date, synthetic=args.synthetic, language=args.language,
            replace=args.replace,
        )
    except VoiceError as exc:
        raise usage_error(f"voice {args.name!r} not added:\n" + "\n".join(exc.problems)) from None
    for note in voice.prepared.notes:
        print(f"note: {note}")
    print(f"added voice {voice.name!r}: {voice.seconds:.1f} s, stored in {voice.folder}")
    return 0


def _list(library: VoiceLibrary, _args) -> int:
    rows = library.entries()
    if not rows:
        print(f"no voices in {library.root}; add one with `chroma-agent voice add`")
        return 0
    width = max(4, *(len(r.name) for r in rows))
    print(f"{'name':<{width}}  {'seconds':>7}  {'loudness':>10}  status")
    for r in rows:
        seconds = f"{r.seconds:.1f}" if r.seconds is not None else "-"
        lufs = f"{r.loudness:.1f} LUFS" if r.loudness is not None else "-"
        print(f"{r.name:<{width}}  {seconds:>7}  {lufs:>10}  {r.status}")
    print(f"({len(rows)} voice{'s' if len(rows) != 1 else ''} in {library.root})")
    return 0


def _check(library: VoiceLibrary, args) -> int:
    is_folder = "/" in args.name or args.name.startswith((".", "~"))
    folder = Path(args.name) if is_folder else library.folder(args.name)
    try:
        voice = load_voice(folder)
    except VoiceError as exc:
        print("\n".join(exc.problems))
        print(f"{folder}: {len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}")
        return 1
    p, consent = voice.prepared, voice.profile.consent
    print(f"{voice.folder}: ok")
    print(f"  {voice.seconds:.1f} s at {p.source_rate} Hz, {p.channels} channel(s); speech in "
          f"{100 * p.speech_fraction:.0f}%; loudness {p.loudness:.1f} LUFS")
    print(f"  consent: {consent.given_by}, {consent.date}, for {consent.use}"
          f"{' (synthetic voice)' if consent.synthetic else ''}")
    for note in p.notes:
        print(f"  note: {note}")
    return 0


def _remove(library: VoiceLibrary, args) -> int:
    folder = library.remove(args.name)
    print(f"removed voice {args.name!r} ({folder})")
    return 0
