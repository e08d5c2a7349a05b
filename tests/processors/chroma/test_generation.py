"""The engine's maths against a plain, cache-free rendering of the reference schedule."""

import pytest
import torch

from processors.chroma.generation import (
    ResponseSteps,
    Sampling,
    ThinkerStream,
    build_voice_prompt,
    prefill_thinker,
)
from tests.conftest import processor_inputs, user_audio


@torch.inference_mode()
def naive_reply(model, inputs, frames):
    """No caches anywhere: every step re-runs the whole sequence, as a training forward would."""
    cfg = model.config
    ids = inputs["thinker_input_ids"]
    feats, fmask = inputs["thinker_input_features"], inputs["thinker_feature_attention_mask"]

    def thinker_next(ids):
        model.thinker.model.rope_deltas = None
        out = model.thinker.model(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                                  attention_mask=torch.ones_like(ids), use_cache=False)
        hidden = out.last_hidden_state[:, -1]
        return hidden, model.thinker.lm_head(hidden).argmax(-1)

    table = model.backbone.audio_embedding
    codes_prompt = model.encode_audio(inputs["input_values"][0])
    text = model.embed_text(torch.tensor([[cfg.text_start_token_id, *inputs["input_ids"][0].tolist(),
                                           cfg.text_end_token_id]]))
    seq = [text[0], table.rows(codes_prompt[0]).sum(-2), torch.zeros(1, text.shape[-1])]
    thinker_done, out_frames, step = False, [], 0
    while step < frames:
        if step > 0:
            seq.append(table.rows(out_frames[-1].view(1, -1)).sum(-2))
        if step % 2 == 0 and not thinker_done:
            hidden, token = thinker_next(ids)
            ids = torch.cat([ids, token.view(1, 1)], dim=1)
            seq += [hidden, model.embed_text(token.view(1))]
            thinker_done = int(token) == cfg.im_end_token_id
        x = torch.cat(seq, dim=0).unsqueeze(0)
        h = model.backbone.model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1]
        frame = [model.backbone.codebook0_head(h).argmax(-1)]
        dec_in = [h, table.rows(frame[0].view(1, 1))[:, 0]]
        for level in range(1, cfg.audio_num_codebooks):
            z = model.decoder.projection(torch.stack(dec_in, dim=1))
            last = model.decoder.model(inputs_embeds=z, use_cache=False).last_hidden_state[:, -1]
            code = model.decoder.codebook_head.weight[level - 1].T.matmul(last.T).T.argmax(-1)
            frame.append(code)
            dec_in.append(table.rows(code.view(1, 1), first_codebook=level)[:, 0])
        out_frames.append(torch.cat(frame).view(-1))
        step += 1
    return torch.stack(out_frames)


def test_generate_codes_matches_the_cache_free_reference_schedule(tiny, voice):
    inputs = processor_inputs(tiny, voice, user_audio(1.0, 11))
    ours = tiny.generate_codes(inputs, max_new_frames=9)
    assert ours.shape == (1, 9, 8)
    assert torch.equal(ours[0], naive_reply(tiny, inputs, 9))


def test_greedy_is_bit_for_bit_repeatable(tiny, voice):
    inputs = processor_inputs(tiny, voice, user_audio(0.8, 12))
    a = tiny.generate_codes(inputs, max_new_frames=16)
    b = tiny.generate_codes(inputs, max_new_frames=16)
    assert torch.equal(a, b)
    assert torch.equal(tiny.decode_codes(a), tiny.decode_codes(b))


def test_sampling_is_seeded_and_differs_from_greedy(tiny, voice):
    inputs = processor_inputs(tiny, voice, user_audio(0.8, 12))
    model = tiny

    def run(seed):
        ids = inputs["thinker_input_ids"]
        vp = build_voice_prompt(model, inputs["input_ids"][0], inputs["input_values"][0])
        from transformers import DynamicCache

        cache = DynamicCache()
        h, t, pos = prefill_thinker(model, ids, cache, 0, inputs["thinker_input_features"],
                                    inputs["thinker_feature_attention_mask"])
        steps = ResponseSteps(model, vp, ThinkerStream(model, cache, pos, h, t), 8, Sampling(True, 20, 0.9, seed))
        return torch.stack([c for c in iter(steps.next_frame, None)])

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), tiny.generate_codes(inputs, 8)[0])


def _scripted(model, monkeypatch, frames):
    script = iter(frames)
    monkeypatch.setattr(model, "decode_frame", lambda *a, **k: torch.tensor([next(script)]))


def test_frame_with_levels_0_to_6_eos_ends_the_reply_but_is_audio(tiny, voice, monkeypatch):
    eos = tiny.config.codebook_eos_token_id
    normal = [5, 6, 7, 8, 9, 10, 11, 12]
    _scripted(tiny, monkeypatch, [normal, normal, [eos] * 7 + [3], normal])
    codes = tiny.generate_codes(processor_inputs(tiny, voice, user_audio(0.5, 1)), max_new_frames=10)
    assert codes.shape[1] == 3 and codes[0, 2].tolist() == [eos] * 7 + [3]


def test_all_eos_frame_ends_the_reply_and_is_not_audio(tiny, voice, monkeypatch):
    eos = tiny.config.codebook_eos_token_id
    normal = [5, 6, 7, 8, 9, 10, 11, 12]
    _scripted(tiny, monkeypatch, [normal, [eos] * 8, normal])
    codes = tiny.generate_codes(processor_inputs(tiny, voice, user_audio(0.5, 1)), max_new_frames=10)
    assert codes.shape[1] == 1
    # an immediate end frame gives an empty reply instead of a crash
    _scripted(tiny, monkeypatch, [[eos] * 8])
    assert tiny.generate_codes(processor_inputs(tiny, voice, user_audio(0.5, 1)), max_new_frames=10).shape[1] == 0


def test_batch_items_are_padded_with_the_pad_id(tiny, voice, monkeypatch):
    inputs = processor_inputs(tiny, voice, user_audio(0.5, 1))
    batched = {k: torch.cat([v, v]) for k, v in inputs.items()}
    eos, pad = tiny.config.codebook_eos_token_id, tiny.config.codebook_pad_token_id
    normal = [5, 6, 7, 8, 9, 10, 11, 12]
    _scripted(tiny, monkeypatch, [normal, [eos] * 8, normal, normal, normal])
    codes = tiny.generate_codes(batched, max_new_frames=3)
    assert codes.shape == (2, 3, 8)
    assert (codes[0, 1:] == pad).all() and (codes[1] != pad).all()
    audio = tiny.decode_codes(codes)
    assert audio.shape == (2, 3 * 1920) and (audio[0, 1920:] == 0).all()


def test_missing_processor_tensor_is_named(tiny):
    with pytest.raises(KeyError, match="input_values"):
        tiny.generate_codes({"thinker_input_ids": torch.zeros(1, 3, dtype=torch.long)}, 4)
