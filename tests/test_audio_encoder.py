"""wav2vec2 audio encoder: 25 fps frame count, interpolation before the transformer, stacked layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.encoders import tiny as te
from inference.encoders.wav2vec2 import (
    AudioEncoder,
    AudioEncoderError,
    interpolate_features,
    num_video_frames,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("w2v")
    ref = te.write_tiny_wav2vec2(root, seed=4)
    return AudioEncoder(root / te.WAV2VEC2_DIR), ref


def _audio(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _upstream_embedding(ref, values: torch.Tensor, num_frames: int) -> torch.Tensor:
    """MultiTalk's subclass forward, step by step: CNN -> interpolate to the video frame count ->
    feature projection -> post-LN encoder; the per-layer outputs stacked to [T, layers, hidden]."""
    with torch.no_grad():
        feats = ref.feature_extractor(values)  # [1, C, T50]
        feats = torch.nn.functional.interpolate(feats, size=num_frames, mode="linear", align_corners=True)
        hidden, _ = ref.feature_projection(feats.transpose(1, 2))
        enc = ref.encoder
        hidden = enc.layer_norm(hidden + enc.pos_conv_embed(hidden))
        layers = []
        for layer in enc.layers:
            hidden = layer(hidden)
            layers.append(hidden[0])
    return torch.stack(layers, dim=1)


def test_frame_count_is_int_seconds_times_25(tiny):
    enc, _ = tiny
    for n in (16000 * 2, 16000 * 3 + 123, 12345, 641):
        out = enc.encode(_audio(n))
        assert out.shape == (int(n / 16000 * 25), te.TINY_WAV2VEC2_LAYERS, te.TINY_WAV2VEC2_DIM)
        assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert num_video_frames(16000 * 4) == 100 and num_video_frames(639) == 0


def test_matches_upstream_interpolate_then_transformer(tiny):
    enc, ref = tiny
    audio = _audio(16000 * 2 + 500, seed=1)
    out = enc.encode(audio)
    values = torch.from_numpy(enc.extractor(audio, sampling_rate=16000, return_tensors="np").input_values)
    expected = _upstream_embedding(ref, values.reshape(1, -1).float(), out.shape[0])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # The CNN runs at ~50 Hz, so the interpolation really halves the rate here.
    with torch.no_grad():
        assert ref.feature_extractor(values.reshape(1, -1).float()).shape[-1] > 1.9 * out.shape[0]


def test_equals_stock_hidden_states_when_no_interpolation_is_needed(tmp_path):
    # A CNN of total stride 640 with kernel == stride gives exactly one feature per 25 fps frame.
    ref = te.write_tiny_wav2vec2(
        tmp_path,
        seed=5,
        conv_dim=(32,) * 8,
        conv_stride=(5, 2, 2, 2, 2, 2, 2, 2),
        conv_kernel=(5, 2, 2, 2, 2, 2, 2, 2),
    )
    enc = AudioEncoder(tmp_path / te.WAV2VEC2_DIR)
    audio = _audio(640 * 30, seed=2)
    out = enc.encode(audio)
    values = torch.from_numpy(enc.extractor(audio, sampling_rate=16000, return_tensors="np").input_values)
    loaded = enc.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())
    with torch.no_grad():  # the same (eager) model through its stock forward, no hook
        stock = enc.model(values.reshape(1, -1).float(), output_hidden_states=True)
    assert out.shape[0] == stock.last_hidden_state.shape[1] == 30
    assert torch.equal(out, torch.stack(stock.hidden_states[1:], dim=2)[0])
    assert torch.equal(out[:, -1], stock.last_hidden_state[0])


def test_feature_extractor_normalisation_makes_gain_irrelevant(tiny):
    enc, _ = tiny
    audio = _audio(16000, seed=3)
    torch.testing.assert_close(enc.encode(audio), enc.encode(audio * 4.0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(enc.encode(audio), enc.encode(_audio(16000, seed=4)))


def test_hook_is_removed_after_each_call(tiny):
    enc, _ = tiny
    enc.encode(_audio(8000))
    assert not enc.model.feature_extractor._forward_hooks
    with torch.no_grad():
        plain = enc.model(torch.zeros(1, 8000), output_hidden_states=True).last_hidden_state
    assert plain.shape[1] > num_video_frames(8000)  # stock rate again (~50 Hz)


def test_interpolate_features_endpoints():
    x = torch.arange(10.0).view(1, 1, 10)
    y = interpolate_features(x, 4)
    assert y.flatten().tolist() == pytest.approx([0.0, 3.0, 6.0, 9.0])  # align_corners keeps both ends


def test_accepts_torch_tensor_and_rejects_bad_audio(tiny, tmp_path):
    enc, _ = tiny
    audio = _audio(4000)
    assert torch.equal(enc.encode(torch.from_numpy(audio)), enc.encode(audio))
    bad = [
        np.zeros((4000, 2), np.float32),
        np.zeros(4000, np.int16),
        np.zeros(500, np.float32),
        np.full(4000, np.nan, np.float32),
        [0.0] * 4000,
    ]
    for b in bad:
        with pytest.raises(AudioEncoderError) as err:
            enc.encode(b)
        assert err.value.field == "audio"
    with pytest.raises(AudioEncoderError) as err:
        AudioEncoder(tmp_path)
    assert err.value.field == "wav2vec2_dir"
