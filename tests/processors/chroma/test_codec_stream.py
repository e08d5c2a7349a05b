import pytest
import torch
from transformers import MimiConfig, MimiModel

from processors.chroma.codec_stream import StreamingCodecDecoder

# The project's `tiny` preset codec, minus the sliding window (set per fixture).
TINY = dict(
    hidden_size=32,
    num_filters=8,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    intermediate_size=64,
    codebook_dim=16,
    vector_quantization_hidden_dimension=16,
    upsample_groups=32,
    num_quantizers=8,
    codebook_size=2048,
    upsampling_ratios=[8, 6, 5, 4],
)
TOL = 1e-4


def _randomise(codec: MimiModel, seed: int) -> None:
    """Fill every learnt tensor with random values, so that each piece of streaming state matters."""
    gen = torch.Generator().manual_seed(seed)
    tensors = list(codec.named_parameters()) + list(codec.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if not t.is_floating_point() or "inv_freq" in name or name.endswith("initialized"):
                continue
            if name.endswith("cluster_usage"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() >= 2:  # scaled by fan-in so activations stay O(1)
                t.copy_(torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3)
    for module in codec.modules():
        if hasattr(module, "_embed"):  # the codebooks cache embed_sum / cluster_usage
            module._embed = None


def _codec(sliding_window: int, state_dict: dict | None = None) -> MimiModel:
    torch.manual_seed(0)
    codec = MimiModel(MimiConfig(**TINY, sliding_window=sliding_window)).eval()
    if state_dict is None:
        _randomise(codec, seed=1)
    else:
        codec.load_state_dict(state_dict)
    return codec


@pytest.fixture(scope="module")
def codec() -> MimiModel:
    return _codec(sliding_window=250)


@pytest.fixture(scope="module")
def small_window_codec(codec) -> MimiModel:
    return _codec(sliding_window=8, state_dict=codec.state_dict())


def _codes(codec: MimiModel, frames: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, codec.config.num_quantizers, frames)
    return torch.randint(0, codec.config.codebook_size, shape, generator=gen)


def _one_shot(codec: MimiModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return codec.decode(codes).audio_values[:, 0]


def _stream(decoder: StreamingCodecDecoder, codes: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    assert sum(chunks) == codes.shape[-1]
    outs, start = [], 0
    for n in chunks:
        out = decoder.decode(codes[..., start : start + n])
        assert out.shape == (codes.shape[0], n * decoder.frame_size)
        outs.append(out)
        start += n
    return torch.cat(outs, dim=-1)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("chunk", [1, 2, 3, 4])
def test_fixed_chunks_match_one_shot(codec, chunk):
    frames = 17  # leaves a final partial chunk for 2, 3 and 4
    codes = _codes(codec, frames)
    ref = _one_shot(codec, codes)
    assert ref.shape[-1] == frames * codec.config.frame_size
    assert ref.abs().max() > 0.1  # a loud enough signal for TOL to mean something

    chunks = [chunk] * (frames // chunk) + ([frames % chunk] if frames % chunk else [])
    out = _stream(StreamingCodecDecoder(codec), codes, chunks)
    assert out.dtype == ref.dtype
    assert _max_diff(out, ref) < TOL


def test_irregular_chunks_match_one_shot(codec):
    chunks = [1, 3, 2, 4, 1, 5, 2]
    codes = _codes(codec, sum(chunks), seed=3)
    out = _stream(StreamingCodecDecoder(codec), codes, chunks)
    assert _max_diff(out, _one_shot(codec, codes)) < TOL


def test_reset_starts_a_fresh_stream(codec):
    stream_a, stream_b = _codes(codec, 7, seed=4), _codes(codec, 9, seed=5)
    fresh = _stream(StreamingCodecDecoder(codec), stream_b, [3, 3, 3])

    decoder = StreamingCodecDecoder(codec)
    _stream(decoder, stream_a, [2, 2, 3])
    continued = _stream(decoder, stream_b, [3, 3, 3])
    assert _max_diff(continued, fresh) > 1e-2  # without reset, stream A's state leaks into B

    decoder.reset()
    _stream(decoder, stream_a, [2, 2, 3])
    decoder.reset()
    after_reset = _stream(decoder, stream_b, [3, 3, 3])
    assert torch.equal(after_reset, fresh)
    assert _max_diff(after_reset, _one_shot(codec, stream_b)) < TOL


@pytest.mark.parametrize("chunks", [[1] * 14, [3, 3, 3, 3, 2], [5, 1, 8]])
def test_stream_longer_than_sliding_window(codec, small_window_codec, chunks):
    codes = _codes(codec, sum(chunks), seed=6)
    ref = _one_shot(small_window_codec, codes)
    steps = sum(chunks) * codec.config.latent_stride  # transformer steps
    assert steps > small_window_codec.config.sliding_window
    assert _max_diff(ref, _one_shot(codec, codes)) > 1e-2  # the window changes the audio

    out = _stream(StreamingCodecDecoder(small_window_codec), codes, chunks)
    assert _max_diff(out, ref) < TOL


def test_single_frame_calls_return_one_frame_each(codec):
    decoder = StreamingCodecDecoder(codec)
    codes = _codes(codec, 3, batch=1, seed=7)
    for i in range(3):
        out = decoder.decode(codes[..., i : i + 1])
        assert out.shape == (1, codec.config.frame_size)


def test_rejects_bad_shapes(codec):
    decoder = StreamingCodecDecoder(codec)
    with pytest.raises(ValueError):
        decoder.decode(_codes(codec, 2)[0])
    with pytest.raises(ValueError):
        decoder.decode(_codes(codec, 2)[..., :0])


def test_key_value_cache_stays_within_the_window(small_window_codec):
    decoder = StreamingCodecDecoder(small_window_codec)
    _stream(decoder, _codes(small_window_codec, 20, seed=8), [2] * 10)
    window = small_window_codec.config.sliding_window
    assert all(layer.keys.shape[-2] < window for layer in decoder._kv.layers)
