import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from processors.chroma.checkpoint import CheckpointError, load_model, save_model
from processors.chroma.config import ChromaConfig, ConfigError, tiny_config_dict
from tests.conftest import processor_inputs, user_audio

# Tensor-name patterns of the released checkpoint (FlashLabs/Chroma-4B layout), layer
# indices written as N; the two tied tensors are not in the files.
RELEASED_PATTERNS = """
backbone.codebook0_head.weight
backbone.model.layers.N.input_layernorm.weight
backbone.model.layers.N.mlp.down_proj.weight
backbone.model.layers.N.mlp.gate_proj.weight
backbone.model.layers.N.mlp.up_proj.weight
backbone.model.layers.N.post_attention_layernorm.weight
backbone.model.layers.N.self_attn.k_proj.weight
backbone.model.layers.N.self_attn.o_proj.weight
backbone.model.layers.N.self_attn.q_proj.weight
backbone.model.layers.N.self_attn.v_proj.weight
backbone.model.norm.weight
codec_model.decoder.layers.N.conv.bias
codec_model.decoder.layers.N.conv.weight
codec_model.decoder.layers.N.block.N.conv.bias
codec_model.decoder.layers.N.block.N.conv.weight
codec_model.decoder_transformer.layers.N.input_layernorm.bias
codec_model.decoder_transformer.layers.N.input_layernorm.weight
codec_model.decoder_transformer.layers.N.mlp.fc1.weight
codec_model.decoder_transformer.layers.N.mlp.fc2.weight
codec_model.decoder_transformer.layers.N.mlp_layer_scale.scale
codec_model.decoder_transformer.layers.N.post_attention_layernorm.bias
codec_model.decoder_transformer.layers.N.post_attention_layernorm.weight
codec_model.decoder_transformer.layers.N.self_attn.k_proj.weight
codec_model.decoder_transformer.layers.N.self_attn.o_proj.weight
codec_model.decoder_transformer.layers.N.self_attn.q_proj.weight
codec_model.decoder_transformer.layers.N.self_attn.v_proj.weight
codec_model.decoder_transformer.layers.N.self_attn_layer_scale.scale
codec_model.downsample.conv.weight
codec_model.encoder.layers.N.conv.bias
codec_model.encoder.layers.N.conv.weight
codec_model.encoder.layers.N.block.N.conv.bias
codec_model.encoder.layers.N.block.N.conv.weight
codec_model.encoder_transformer.layers.N.input_layernorm.bias
codec_model.encoder_transformer.layers.N.input_layernorm.weight
codec_model.encoder_transformer.layers.N.mlp.fc1.weight
codec_model.encoder_transformer.layers.N.mlp.fc2.weight
codec_model.encoder_transformer.layers.N.mlp_layer_scale.scale
codec_model.encoder_transformer.layers.N.post_attention_layernorm.bias
codec_model.encoder_transformer.layers.N.post_attention_layernorm.weight
codec_model.encoder_transformer.layers.N.self_attn.k_proj.weight
codec_model.encoder_transformer.layers.N.self_attn.o_proj.weight
codec_model.encoder_transformer.layers.N.self_attn.q_proj.weight
codec_model.encoder_transformer.layers.N.self_attn.v_proj.weight
codec_model.encoder_transformer.layers.N.self_attn_layer_scale.scale
codec_model.quantizer.acoustic_residual_vector_quantizer.input_proj.weight
codec_model.quantizer.acoustic_residual_vector_quantizer.layers.N.codebook.cluster_usage
codec_model.quantizer.acoustic_residual_vector_quantizer.layers.N.codebook.embed_sum
codec_model.quantizer.acoustic_residual_vector_quantizer.layers.N.codebook.initialized
codec_model.quantizer.acoustic_residual_vector_quantizer.output_proj.weight
codec_model.quantizer.semantic_residual_vector_quantizer.input_proj.weight
codec_model.quantizer.semantic_residual_vector_quantizer.layers.N.codebook.cluster_usage
codec_model.quantizer.semantic_residual_vector_quantizer.layers.N.codebook.embed_sum
codec_model.quantizer.semantic_residual_vector_quantizer.layers.N.codebook.initialized
codec_model.quantizer.semantic_residual_vector_quantizer.output_proj.weight
codec_model.upsample.conv.weight
decoder.audio_embedding.embed_audio_tokens.weight
decoder.codebook_head.weight
decoder.model.layers.N.input_layernorm.weight
decoder.model.layers.N.mlp.down_proj.weight
decoder.model.layers.N.mlp.gate_proj.weight
decoder.model.layers.N.mlp.up_proj.weight
decoder.model.layers.N.post_attention_layernorm.weight
decoder.model.layers.N.self_attn.k_proj.weight
decoder.model.layers.N.self_attn.o_proj.weight
decoder.model.layers.N.self_attn.q_proj.weight
decoder.model.layers.N.self_attn.v_proj.weight
decoder.model.norm.weight
decoder.projection.weight
thinker.audio_tower.audio_bos_eos_token.weight
thinker.audio_tower.conv1.bias
thinker.audio_tower.conv1.weight
thinker.audio_tower.conv2.bias
thinker.audio_tower.conv2.weight
thinker.audio_tower.layers.N.fc1.bias
thinker.audio_tower.layers.N.fc1.weight
thinker.audio_tower.layers.N.fc2.bias
thinker.audio_tower.layers.N.fc2.weight
thinker.audio_tower.layers.N.final_layer_norm.bias
thinker.audio_tower.layers.N.final_layer_norm.weight
thinker.audio_tower.layers.N.self_attn.k_proj.weight
thinker.audio_tower.layers.N.self_attn.out_proj.bias
thinker.audio_tower.layers.N.self_attn.out_proj.weight
thinker.audio_tower.layers.N.self_attn.q_proj.bias
thinker.audio_tower.layers.N.self_attn.q_proj.weight
thinker.audio_tower.layers.N.self_attn.v_proj.bias
thinker.audio_tower.layers.N.self_attn.v_proj.weight
thinker.audio_tower.layers.N.self_attn_layer_norm.bias
thinker.audio_tower.layers.N.self_attn_layer_norm.weight
thinker.audio_tower.ln_post.bias
thinker.audio_tower.ln_post.weight
thinker.audio_tower.proj.bias
thinker.audio_tower.proj.weight
thinker.model.embed_tokens.weight
thinker.model.layers.N.input_layernorm.weight
thinker.model.layers.N.mlp.down_proj.weight
thinker.model.layers.N.mlp.gate_proj.weight
thinker.model.layers.N.mlp.up_proj.weight
thinker.model.layers.N.post_attention_layernorm.weight
thinker.model.layers.N.self_attn.k_proj.bias
thinker.model.layers.N.self_attn.k_proj.weight
thinker.model.layers.N.self_attn.o_proj.weight
thinker.model.layers.N.self_attn.q_proj.bias
thinker.model.layers.N.self_attn.q_proj.weight
thinker.model.layers.N.self_attn.v_proj.bias
thinker.model.layers.N.self_attn.v_proj.weight
thinker.model.norm.weight
thinker.visual.blocks.N.attn.k.bias
thinker.visual.blocks.N.attn.k.weight
thinker.visual.blocks.N.attn.proj.bias
thinker.visual.blocks.N.attn.proj.weight
thinker.visual.blocks.N.attn.q.bias
thinker.visual.blocks.N.attn.q.weight
thinker.visual.blocks.N.attn.v.bias
thinker.visual.blocks.N.attn.v.weight
thinker.visual.blocks.N.mlp.down_proj.bias
thinker.visual.blocks.N.mlp.down_proj.weight
thinker.visual.blocks.N.mlp.gate_proj.bias
thinker.visual.blocks.N.mlp.gate_proj.weight
thinker.visual.blocks.N.mlp.up_proj.bias
thinker.visual.blocks.N.mlp.up_proj.weight
thinker.visual.blocks.N.norm1.weight
thinker.visual.blocks.N.norm2.weight
thinker.visual.merger.ln_q.weight
thinker.visual.merger.mlp.N.bias
thinker.visual.merger.mlp.N.weight
thinker.visual.patch_embed.proj.weight
""".split()


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    return save_model(tiny, tmp_path_factory.mktemp("tiny-ckpt"))


def _codes(model, voice):
    return model.generate_codes(processor_inputs(model, voice, user_audio(1.0, 3)), max_new_frames=12)


def test_saved_file_uses_the_released_names(saved):
    names = load_file(str(saved / "model.safetensors")).keys()
    patterns = {re.sub(r"\.\d+\.", ".N.", re.sub(r"\.\d+\.", ".N.", n)) for n in names}
    assert patterns == set(RELEASED_PATTERNS)
    assert "thinker.lm_head.weight" not in names
    assert "backbone.audio_embedding.embed_audio_tokens.weight" not in names


def test_round_trip_through_the_real_loader_gives_identical_outputs(tiny, voice, saved):
    loaded = load_model(str(saved), device="cpu")
    assert loaded.source == str(saved)
    codes = _codes(loaded, voice)
    assert torch.equal(codes, _codes(tiny, voice))
    assert torch.equal(loaded.decode_codes(codes), tiny.decode_codes(codes))
    # ties hold after loading
    assert loaded.thinker.lm_head.weight.data_ptr() == loaded.thinker.model.language_model.embed_tokens.weight.data_ptr()
    assert (loaded.backbone.audio_embedding.embed_audio_tokens.weight.data_ptr()
            == loaded.decoder.audio_embedding.embed_audio_tokens.weight.data_ptr())


def test_sharded_checkpoint_and_present_tied_tensors_load(tiny, voice, tmp_path):
    folder = save_model(tiny, tmp_path / "sharded", max_shard_bytes=2_000_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    # a file written by a tool that keeps tied tensors must load too
    extra = {"thinker.lm_head.weight": tiny.thinker.lm_head.weight.detach().clone()}
    save_file(extra, str(folder / "tied.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["thinker.lm_head.weight"] = "tied.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = load_model(folder, device="cpu")
    assert torch.equal(_codes(loaded, voice), _codes(tiny, voice))


def _edited_copy(saved, tmp_path, edit):
    tensors = load_file(str(saved / "model.safetensors"))
    edit(tensors)
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "config.json").write_text((saved / "config.json").read_text())
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_missing_tensor_is_named(saved, tmp_path):
    folder = _edited_copy(saved, tmp_path, lambda t: t.pop("decoder.projection.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): decoder\.projection\.weight"):
        load_model(folder, device="cpu")


def test_unexpected_tensor_is_named(saved, tmp_path):
    folder = _edited_copy(saved, tmp_path, lambda t: t.update({"backbone.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): backbone\.extra_head\.weight"):
        load_model(folder, device="cpu")


def test_misshaped_tensor_is_named_with_both_shapes(saved, tmp_path):
    folder = _edited_copy(saved, tmp_path, lambda t: t.update({"backbone.codebook0_head.weight": torch.zeros(7, 64)}))
    with pytest.raises(CheckpointError) as info:
        load_model(folder, device="cpu")
    assert "wrong shape (1): backbone.codebook0_head.weight: file [7, 64], model [2051, 64]" in str(info.value)


def test_all_three_problems_reported_together(saved, tmp_path):
    def edit(t):
        t.pop("thinker.model.norm.weight")
        t["junk"] = torch.zeros(1)
        t["decoder.model.norm.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError) as info:
        load_model(_edited_copy(saved, tmp_path, edit), device="cpu")
    text = str(info.value)
    assert "missing" in text and "unexpected" in text and "wrong shape" in text


def test_folder_that_is_not_a_chroma_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a Chroma checkpoint"):
        load_model(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type is 'llama', expected 'chroma'"):
        load_model(tmp_path, device="cpu")


def test_nonexistent_source_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(str(tmp_path / "nope" / "deeper"), device="cpu")


def test_config_accepts_rope_theta_or_rope_parameters_and_checks_values():
    data = tiny_config_dict()
    data["backbone_config"].pop("rope_theta")
    data["backbone_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
    assert ChromaConfig.from_dict(data).backbone_config.rope_parameters["rope_theta"] == 123.0
    data = tiny_config_dict()
    data["decoder_config"]["audio_num_codebooks"] = 4
    with pytest.raises(ConfigError, match="decoder_config.audio_num_codebooks is 4, expected 8"):
        ChromaConfig.from_dict(data)


def test_default_device_and_dtype_without_cuda(tiny):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the default is CUDA + bf16")
    model = load_model("tiny")
    assert model.device.type == "cpu" and model.dtype == torch.float32


def test_the_random_4b_preset_has_the_released_models_dimensions():
    """Built on the meta device (no memory): the sizes chroma-facts.md gives for the released model."""
    from processors.chroma.checkpoint import _construct
    from processors.chroma.config import preset_config

    model = _construct(preset_config("random-4b"), torch.device("meta"), torch.bfloat16)
    millions = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
    backbone = model.config.backbone_config
    assert (backbone.num_hidden_layers, backbone.hidden_size, backbone.num_attention_heads) == (16, 2048, 32)
    assert model.config.thinker_config.text_config.vocab_size == 151936
    assert 950 < millions(model.backbone) < 1100  # ~1B
    assert 3000 < millions(model.thinker) < 4000  # ~3B with its audio encoder
    assert 100 < millions(model.decoder) < 200  # ~100M


def test_a_model_whose_frame_step_fused_its_projections_saves_and_loads_back(voice, tmp_path):
    """The frame step leaves q/k/v and gate/up as views into fused matrices; saving must still write
    each tensor under its released name, and the model loaded back must answer the same."""
    from processors.chroma.frame_step import FrameStep

    model = load_model("tiny", device="cpu")
    FrameStep(model, rows=1)
    layer = model.backbone.model.layers[0].self_attn
    assert layer.q_proj.weight.untyped_storage().data_ptr() == layer.k_proj.weight.untyped_storage().data_ptr()
    save_model(model, tmp_path / "fused")
    loaded = load_model(str(tmp_path / "fused"), device="cpu")
    inputs = processor_inputs(model, voice, user_audio(0.6, 5))
    assert torch.equal(model.generate_codes(inputs, 6), loaded.generate_codes(inputs, 6))
