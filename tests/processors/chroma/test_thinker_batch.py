"""Batched thinker decoding: the same tokens, hidden states and caches as one forward per reply."""

import pytest
import torch
from transformers import DynamicCache

from processors.chroma.checkpoint import load_model
from processors.chroma.generation import ThinkerStream, prefill_thinker, truncate_cache
from processors.chroma.thinker_batch import decode_together, thinker_text_step
from tests.conftest import processor_inputs, user_audio

# (seconds of user audio, seed, system prompt): different audio and prompts give caches of different lengths
CALLS = [
    (0.4, 31, "You are a helpful agent."),
    (1.1, 32, ""),
    (0.7, 33, "You answer questions about train times, briefly and politely."),
    (0.9, 34, "Be kind."),
]
# float32 on CPU: the batched projections may sum in another order than a one-row product
HIDDEN_TOLERANCE = 1e-5


@torch.inference_mode()
def stream_pairs(model, voice, calls=CALLS, **stream_kwargs):
    """For each call, two streams from one prefill with separate copies of its cache."""
    pairs = []
    for seconds, seed, prompt in calls:
        inputs = processor_inputs(model, voice, user_audio(seconds, seed), prompt)
        cache = DynamicCache()
        hidden, token, position = prefill_thinker(
            model, inputs["thinker_input_ids"], cache, 0,
            inputs["thinker_input_features"], inputs["thinker_feature_attention_mask"],
        )
        twin = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v, _ in cache])
        pairs.append((
            ThinkerStream(model, cache, position, hidden, token, **stream_kwargs),
            ThinkerStream(model, twin, position, hidden, token, **stream_kwargs),
        ))
    return pairs


def hidden_states(stream):
    return torch.cat([t.hidden for t in stream._ready])


def assert_same(alone, together):
    assert together.raw_tokens == alone.raw_tokens
    assert together.next_position == alone.next_position
    assert [t.token_id for t in together._ready] == [t.token_id for t in alone._ready]
    assert torch.allclose(hidden_states(together), hidden_states(alone), rtol=0, atol=HIDDEN_TOLERANCE)
    assert torch.equal(
        torch.cat([t.embedding for t in together._ready]), torch.cat([t.embedding for t in alone._ready])
    )
    assert together.cache.get_seq_length() == alone.cache.get_seq_length()
    for (k1, v1, _), (k2, v2, _) in zip(alone.cache, together.cache, strict=True):
        assert torch.allclose(k2, k1, rtol=0, atol=HIDDEN_TOLERANCE)
        assert torch.allclose(v2, v1, rtol=0, atol=HIDDEN_TOLERANCE)


def test_tiny_is_on_the_batched_path(tiny):
    assert thinker_text_step(tiny).unsupported is None


def test_the_calls_have_caches_of_different_lengths(tiny, voice):
    lengths = {alone.cache.get_seq_length() for alone, _ in stream_pairs(tiny, voice)}
    assert len(lengths) == len(CALLS)


def test_decoding_together_equals_one_forward_per_stream(tiny, voice):
    pairs = stream_pairs(tiny, voice, max_tokens=10_000)
    for _ in range(8):
        for alone, _ in pairs:
            alone._decode_one()
        decode_together(tiny, [together for _, together in pairs])
    for alone, together in pairs:
        assert len(together.raw_tokens) == 9
        assert_same(alone, together)


def test_single_forwards_and_truncation_continue_from_a_batched_cache(tiny, voice):
    pairs = stream_pairs(tiny, voice, max_tokens=10_000)
    cut = [alone.cache.get_seq_length() + 2 for alone, _ in pairs]
    for _ in range(4):
        for alone, _ in pairs:
            alone._decode_one()
        decode_together(tiny, [together for _, together in pairs])
    for (alone, together), length in zip(pairs, cut, strict=True):
        for stream in (alone, together):
            truncate_cache(stream.cache, length)  # as barge-in keeps only what the caller heard
            assert stream.cache.get_seq_length() == length
            stream._decode_one()
        assert_same(alone, together)
    decode_together(tiny, [together for _, together in pairs[1:]])  # a batch without the first call
    for alone, _ in pairs[1:]:
        alone._decode_one()
    for alone, together in pairs:
        assert_same(alone, together)


def test_a_stream_that_ends_leaves_the_batch(tiny, voice):
    pairs = stream_pairs(tiny, voice, max_tokens=10_000)
    short_alone, short_together = pairs[1]
    short_alone.max_tokens = short_together.max_tokens = 4
    for _ in range(6):
        for alone, _ in pairs:
            if not alone._ended:
                alone._decode_one()
        decode_together(tiny, [together for _, together in pairs if not together._ended])
    assert short_together._ended and len(short_together.raw_tokens) == 4
    for alone, together in pairs:
        assert_same(alone, together)
    with pytest.raises(ValueError, match="ended"):
        decode_together(tiny, [together for _, together in pairs])
    assert len(short_together.raw_tokens) == 4  # refused before anything ran


def test_a_stream_given_twice_is_refused(tiny, voice):
    (_, together), *_ = stream_pairs(tiny, voice, CALLS[:1])
    length = together.cache.get_seq_length()
    with pytest.raises(ValueError, match="twice"):
        decode_together(tiny, [together, together])
    assert together.cache.get_seq_length() == length


def test_an_empty_batch_does_nothing(tiny):
    decode_together(tiny, [])


def test_a_configuration_not_mirrored_falls_back_to_single_forwards(tiny, voice, monkeypatch):
    pairs = stream_pairs(tiny, voice, CALLS[:2], max_tokens=10_000)
    monkeypatch.setattr(thinker_text_step(tiny), "unsupported", "test")
    for _ in range(3):
        for alone, _ in pairs:
            alone._decode_one()
        decode_together(tiny, [together for _, together in pairs])
    for alone, together in pairs:
        assert_same(alone, together)


def test_eager_attention_is_mirrored_too(voice):
    model = load_model("tiny", device="cpu")
    model.thinker.model.language_model.config._attn_implementation = "eager"
    assert thinker_text_step(model).attention == "eager"
    assert thinker_text_step(model).unsupported is None
    pairs = stream_pairs(model, voice, CALLS[:3], max_tokens=10_000)
    for _ in range(5):
        for alone, _ in pairs:
            alone._decode_one()
        decode_together(model, [together for _, together in pairs])
    for alone, together in pairs:
        assert_same(alone, together)
