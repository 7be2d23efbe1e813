"""The shared LM core (moeut/lm.py) against independent references: the layer schedule against
hand-written lists, attention with a KV cache (appended in chunks of several tokens) against a
naive per-query softmax loop, and the base class' errors."""
import math

import pytest
import torch

from moeut.lm import KVCache, LanguageModel, attend, layer_schedule


def test_layer_schedule_hand_written():
    assert layer_schedule(2, 3, "abab") == [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1), (4, 0, 2), (5, 1, 2)]
    assert layer_schedule(2, 3, "aabb") == [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 1, 0), (4, 1, 1), (5, 1, 2)]
    assert layer_schedule(1, 3) == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]  # SUT / naive UT: one layer
    with pytest.raises(ValueError, match="layer_order"):
        layer_schedule(2, 2, "abba")


def _naive_attention(q_BHTD, k_BHSD, v_BHSD, first_pos, causal, scale, valid_BS=None):
    """Per query: softmax over the keys it may see (positions <= its own when causal)."""
    B, H, T, D = q_BHTD.shape
    out = torch.zeros_like(q_BHTD)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                pos = first_pos + t
                keys = [s for s in range(k_BHSD.shape[2]) if (not causal or s <= pos)
                        and (valid_BS is None or bool(valid_BS[b, s]))]
                logits = torch.stack([q_BHTD[b, h, t] @ k_BHSD[b, h, s] * scale for s in keys])
                w = logits.softmax(0)
                out[b, h, t] = sum(w[i] * v_BHSD[b, h, s] for i, s in enumerate(keys))
    return out


def test_attend_with_cache_in_chunks_equals_naive_causal_attention():
    torch.manual_seed(0)
    B, H, S, D = 2, 3, 9, 4
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    ref = _naive_attention(q, k, v, 0, True, 1 / math.sqrt(D))
    cache = KVCache()
    outs = []
    for start, end in ((0, 4), (4, 5), (5, 9)):  # a prompt, one token, then a chunk of 4 after the cache
        outs.append(attend(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], 7, cache))
        cache.seq_len += end - start  # the model advances the cache once per forward
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=1e-12, atol=1e-12)
    assert set(cache.k) == {7} and cache.k[7].shape == (B, H, S, D) and torch.equal(cache.v[7], v)


def test_attend_bidirectional_masks_padded_keys():
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 6, 4
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 4:] = False
    got = attend(q, k, v, 0, None, causal=False, valid_BT=valid, scale=0.5)
    torch.testing.assert_close(got, _naive_attention(q, k, v, 0, False, 0.5, valid), rtol=1e-12, atol=1e-12)


def test_base_class_names_the_missing_hook():
    class Incomplete(LanguageModel):
        pass

    with pytest.raises(NotImplementedError, match=r"Incomplete must define embed\(input_ids\)"):
        Incomplete()(torch.zeros(1, 2, dtype=torch.long))
