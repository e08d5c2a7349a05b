"""`decode_together`: several calls' chunks in one batched pass give what each call's `decode` gives alone."""

import pytest
import torch
from transformers import MimiConfig, MimiModel

from processors.chroma.codec_stream import StreamingCodecDecoder, decode_together

# Batched convs and attention over padded keys sum in another order than the one-row pass; float32
# rounding of that order is ~1e-7 relative, far below this bound on audio that peaks above 0.1.
TOL = 1e-5


@pytest.fixture(scope="module")
def codec(tiny) -> MimiModel:
    return tiny.codec_model


@pytest.fixture(scope="module")
def small_window_codec(codec) -> MimiModel:
    """The tiny codec with an 8-step (4-frame) attention window, so streams pass it in a few chunks."""
    config = MimiConfig(**{**codec.config.to_dict(), "sliding_window": 8})
    small = MimiModel(config).eval()
    small.load_state_dict(codec.state_dict())
    return small


def _chunk(codec: MimiModel, frames: int, seed: int, rows: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, codec.config.num_quantizers, frames)
    return torch.randint(0, codec.config.codebook_size, shape, generator=gen)


def _twins(codec: MimiModel, prior_chunks: list[int], frames: int = 2, rows: int = 1):
    """Pairs of decoders with the same history: one to decode together, one alone."""
    together, alone = [], []
    for i, prior in enumerate(prior_chunks):
        a, b = StreamingCodecDecoder(codec), StreamingCodecDecoder(codec)
        for j in range(prior):
            chunk = _chunk(codec, frames, seed=1000 * i + j, rows=rows)
            a.decode(chunk), b.decode(chunk)
        together.append(a)
        alone.append(b)
    return together, alone


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _assert_same_state(codec, together, alone, seed: int) -> None:
    """The state is the same if the next chunk, decoded alone by both, comes out the same."""
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert a._kv.steps == b._kv.steps
        chunk = _chunk(codec, 2, seed=seed + i, rows=a._carry.shape[0])
        assert _max_diff(a.decode(chunk), b.decode(chunk)) <= TOL


def _tick(codec, together, alone, frames: list[int], seed: int) -> None:
    codes = [
        _chunk(codec, n, seed=seed + i, rows=d._carry.shape[0] if d._carry is not None else 1)
        for i, (d, n) in enumerate(zip(together, frames, strict=True))
    ]
    outs = decode_together(together, codes)
    for out, b, c in zip(outs, alone, codes, strict=True):
        ref = b.decode(c)
        assert out.shape == ref.shape == (c.shape[0], c.shape[-1] * codec.config.frame_size)
        assert ref.abs().max() > 0.1  # a loud enough signal for TOL to mean something
        assert _max_diff(out, ref) <= TOL


@pytest.mark.parametrize("which", ["codec", "small_window_codec"])
def test_calls_started_at_different_times(request, which):
    codec = request.getfixturevalue(which)
    window_chunks = codec.config.sliding_window // codec.config.latent_stride // 2
    # fresh, a few chunks in, just short of the window, and past it
    together, alone = _twins(codec, [0, 1, 3, window_chunks - 1, window_chunks + 2])
    lengths = {d._kv.length for d in together}
    assert len(lengths) >= 3 and min(lengths) == 0 and max(lengths) == codec.config.sliding_window - 1
    _tick(codec, together, alone, [2] * len(together), seed=50)
    _assert_same_state(codec, together, alone, seed=60)


def test_several_ticks_with_calls_joining_and_leaving(small_window_codec):
    codec = small_window_codec
    together, alone = _twins(codec, [0, 2, 5])
    for tick in range(8):
        if tick == 3:  # a new call joins, fresh
            a, b = _twins(codec, [0])
            together += a
            alone += b
        live = [i for i in range(len(together)) if not (tick % 3 == 1 and i == 1)]  # call 1 skips ticks
        _tick(codec, [together[i] for i in live], [alone[i] for i in live], [2] * len(live), seed=100 * tick)
    _assert_same_state(codec, together, alone, seed=900)


def test_mixed_chunk_lengths_are_grouped(small_window_codec):
    codec = small_window_codec
    together, alone = _twins(codec, [0, 1, 4, 6, 2])
    _tick(codec, together, alone, [1, 2, 3, 2, 1], seed=70)
    _assert_same_state(codec, together, alone, seed=80)


def test_calls_of_several_rows(small_window_codec):
    codec = small_window_codec
    together, alone = _twins(codec, [1, 5], rows=2)
    fresh_a, fresh_b = _twins(codec, [0])
    _tick(codec, together + fresh_a, alone + fresh_b, [2, 2, 2], seed=90)
    _assert_same_state(codec, together + fresh_a, alone + fresh_b, seed=95)


def test_one_call_together_is_decode(codec):
    together, alone = _twins(codec, [3])
    _tick(codec, together, alone, [2], seed=40)
    _assert_same_state(codec, together, alone, seed=45)


def test_rejects_misuse(codec, small_window_codec):
    a, b = StreamingCodecDecoder(codec), StreamingCodecDecoder(small_window_codec)
    chunk = _chunk(codec, 2, seed=0)
    assert decode_together([], []) == []
    with pytest.raises(ValueError, match="one codec"):
        decode_together([a, b], [chunk, chunk])
    with pytest.raises(ValueError, match="twice"):
        decode_together([a, a], [chunk, chunk])
    with pytest.raises(ValueError):
        decode_together([a], [chunk, chunk])
    with pytest.raises(ValueError):
        decode_together([a], [chunk[..., :0]])
    a.decode(chunk)
    with pytest.raises(ValueError, match="rows"):
        decode_together([a], [_chunk(codec, 2, seed=1, rows=2)])


def test_replicate_padding_starts_from_the_first_sample(codec):
    """pad_mode="replicate": a fresh stream's conv context is its first input sample, per row."""
    config = MimiConfig(**{**codec.config.to_dict(), "pad_mode": "replicate", "sliding_window": 8})
    replicate = MimiModel(config).eval()
    replicate.load_state_dict(codec.state_dict())
    codes = _chunk(replicate, 6, seed=11)
    with torch.inference_mode():
        one_shot = replicate.decode(codes).audio_values[:, 0]
    decoder = StreamingCodecDecoder(replicate)
    streamed = torch.cat([decoder.decode(codes[..., i : i + 2]) for i in range(0, 6, 2)], dim=-1)
    assert _max_diff(streamed, one_shot) < 1e-4  # the bound of test_codec_stream.py

    together, alone = _twins(replicate, [0, 2, 0])
    _tick(replicate, together, alone, [2, 2, 2], seed=12)
    _assert_same_state(replicate, together, alone, seed=13)
