"""A voice's codec codes: computed once per model, stored beside the voice, reused, recomputed on change."""

import asyncio

import soundfile
import torch

from processors.chroma.checkpoint import build_tiny
from tests.conftest import user_audio
from voices.codes import codes_path, model_identity
from voices.profile import load_voice


def count_encodes(monkeypatch, model) -> list[int]:
    calls = []
    real = model.encode_audio
    monkeypatch.setattr(model, "encode_audio", lambda audio: calls.append(audio.shape[-1]) or real(audio))
    return calls


def test_codes_are_encoded_once_stored_and_reused(demo_voice, monkeypatch):
    model = build_tiny()
    calls = count_encodes(monkeypatch, model)
    voice = load_voice(demo_voice)
    codes = voice.codes_for(model)
    assert calls == [voice.audio.size]
    path = codes_path(voice, model)
    assert path.parent == demo_voice / "codes" and path.name == f"{model_identity(model)}.npz" and path.exists()
    with torch.inference_mode():
        expected = model.encode_audio(torch.from_numpy(voice.audio).reshape(1, 1, -1))[0]
    assert torch.equal(codes, expected)
    assert codes.shape == (expected.shape[0], model.config.audio_num_codebooks)

    # Another process: the voice read again, the same weights loaded again. No encode.
    reloaded, same_weights = load_voice(demo_voice), build_tiny()
    assert model_identity(same_weights) == model_identity(model)
    calls_again = count_encodes(monkeypatch, same_weights)
    assert torch.equal(reloaded.codes_for(same_weights), codes)
    assert calls_again == []


def test_other_weights_get_their_own_codes(demo_voice, monkeypatch):
    voice = load_voice(demo_voice)
    first, other = build_tiny(), build_tiny(seed=99)  # the default seed is 1234
    voice.codes_for(first)
    assert model_identity(other) != model_identity(first)
    calls = count_encodes(monkeypatch, other)
    voice.codes_for(other)
    assert len(calls) == 1
    assert sorted(p.name for p in (demo_voice / "codes").iterdir()) == sorted(
        f"{model_identity(m)}.npz" for m in (first, other))


def test_a_replaced_recording_is_encoded_again(demo_voice, monkeypatch):
    model = build_tiny()
    before = load_voice(demo_voice).codes_for(model)
    audio, rate = soundfile.read(str(demo_voice / "reference.wav"))
    soundfile.write(str(demo_voice / "reference.wav"), audio[: int(len(audio) * 0.8)], rate)
    calls = count_encodes(monkeypatch, model)
    after = load_voice(demo_voice).codes_for(model)
    assert len(calls) == 1 and after.shape[0] < before.shape[0]


def test_a_damaged_codes_file_is_recomputed(demo_voice, monkeypatch):
    model = build_tiny()
    voice = load_voice(demo_voice)
    good = voice.codes_for(model)
    codes_path(voice, model).write_bytes(b"not numpy")
    calls = count_encodes(monkeypatch, model)
    assert torch.equal(voice.codes_for(model), good) and len(calls) == 1


def test_a_session_builds_the_prefix_from_stored_codes_with_the_same_result(demo_voice, monkeypatch):
    voice = load_voice(demo_voice)
    voice.codes_for(build_tiny())  # stored by an earlier process
    model = build_tiny()  # a fresh model: nothing cached in this process for it
    calls = count_encodes(monkeypatch, model)
    audio = user_audio(0.5, 3)

    async def reply(session):
        return torch.cat([chunk.codes async for chunk in session.respond(audio)])

    from_library = asyncio.run(reply(model.new_session(voice, "Be brief.", max_frames=6)))
    assert calls == []
    from_reference = asyncio.run(
        reply(model.new_session((voice.audio, voice.transcript), "Be brief.", max_frames=6, reuse_voice_prompt=False))
    )
    assert len(calls) == 1  # the reference's way encodes the recording for the reply
    assert torch.equal(from_library, from_reference)


def test_codes_that_cannot_be_stored_are_still_used(demo_voice, monkeypatch):
    import voices.codes

    def refuse(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(voices.codes.np, "savez", refuse)
    model = build_tiny()
    codes = load_voice(demo_voice).codes_for(model)
    assert codes.shape[1] == model.config.audio_num_codebooks
    assert not list((demo_voice / "codes").glob("*.npz"))
