"""Tests for :mod:`specvlm_lit.drafter.eagle` against a tiny random LLaVA target (hidden 64, vocab 120)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from specvlm_lit import kv_cache
from specvlm_lit.attention_masks import prefix_mask
from specvlm_lit.drafter.compressor import SelectCompressor
from specvlm_lit.drafter.eagle import (
    DrafterLoadError,
    DrafterMismatchError,
    DrafterOutput,
    EagleVLMConfig,
    EagleVLMDrafter,
    check_export_path,
    save_atomically,
)
from specvlm_lit.drafter.sequence import build_draft_sequence
from specvlm_lit.target import TargetAdapter
from specvlm_lit.targets import VisualLayout
from specvlm_lit.utils.atomic import MARKER, ForeignDirectoryError
from tests.helpers import root_path, tree_from_parents
from tests.test_target_adapter import build_tiny_llava, make_vlm_inputs, tiny_llava_config

torch.set_num_threads(1)
ATOL = 1e-5

# Branching draft tree: 0 -> {1, 2}; 1 -> 3; 2 -> {4, 5}; 3 -> 6; 5 -> 7
PARENTS = [-1, 0, 0, 1, 2, 2, 3, 5]
ALL_BRANCHES = {
    "type": "select",
    "branches": {
        "prune": {"type": "prune", "ratio": 4},
        "pool": {"type": "pool", "ratio": 4},
        "conv": {"type": "conv", "ratio": 4},
        "resampler": {"type": "resampler", "num_queries": 2},
        "weighted": {"type": "weighted", "ratio": 4},
        "concat": {
            "type": "concat",
            "branches": {"a": {"type": "prune", "ratio": 20}, "b": {"type": "pool", "ratio": 16}},
        },
        "text_only": {"type": "text_only"},
    },
}


@pytest.fixture(scope="module")
def adapter() -> TargetAdapter:
    return TargetAdapter(build_tiny_llava(seed=0))


def make_drafter(adapter, seed=0, **overrides) -> EagleVLMDrafter:
    torch.manual_seed(seed)
    drafter = EagleVLMDrafter(EagleVLMConfig.from_target(adapter, **overrides)).eval()
    # Random-init norm gains / biases are trivial (ones / zeros); perturb every parameter so that tests also cover
    # them (e.g. a forgotten norm would otherwise be an identity).
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return drafter


def rows(b, t, h=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.02 * torch.randn(b, t, h, generator=g), torch.randn(b, t, h, generator=g)


# ---------------------------------------------------------------------------------------------------- config
def test_config_from_target(adapter):
    cfg = EagleVLMConfig.from_target(adapter)
    tc = adapter.text_config
    assert cfg.model_type == "eagle_vlm"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        tc.hidden_size,
        tc.intermediate_size,
        tc.num_attention_heads,
        tc.num_key_value_heads,
    )
    assert cfg.head_dim == tc.hidden_size // tc.num_attention_heads
    assert cfg.rope_parameters["rope_theta"] == tc.rope_parameters["rope_theta"]
    assert cfg.max_position_embeddings == tc.max_position_embeddings and cfg.rms_norm_eps == tc.rms_norm_eps
    assert cfg.vocab_size == adapter.vocab_size == 120
    assert cfg.target_fingerprint == adapter.fingerprint()
    assert cfg.compressor is None
    # overrides; None for an architecture field keeps the target's (Hydra "null = the target's")
    cfg2 = EagleVLMConfig.from_target(adapter, intermediate_size=None, compressor={"type": "prune", "ratio": 4})
    assert cfg2.intermediate_size == tc.intermediate_size and cfg2.compressor == {"type": "prune", "ratio": 4}
    assert EagleVLMConfig.from_target(adapter, intermediate_size=96).intermediate_size == 96
    with pytest.raises(ValueError, match="hidden size must equal the target"):
        EagleVLMConfig.from_target(adapter, hidden_size=32)
    # from a plain HF config (no fingerprint available)
    cfg3 = EagleVLMConfig.from_target(tiny_llava_config())
    assert cfg3.hidden_size == 64 and cfg3.vocab_size == 120 and cfg3.target_fingerprint is None
    # legacy rope_theta keyword
    assert (
        EagleVLMConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0).rope_parameters["rope_theta"] == 500.0
    )
    with pytest.raises(ValueError, match="valid types"):
        EagleVLMConfig.from_target(adapter, compressor={"type": "zip"})


def test_parameters_exclude_embedding_and_lm_head(adapter):
    drafter = make_drafter(adapter)
    names = [n for n, _ in drafter.named_parameters()]
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    assert all(p.shape[0] != adapter.vocab_size for p in drafter.parameters())
    assert set(drafter.state_dict()) == set(names)  # no buffers either (rotary inv_freq is not persistent)
    target_ids = {id(p) for p in adapter.model.parameters()}
    assert not target_ids & {id(p) for p in drafter.parameters()}
    assert {n.split(".")[0] for n in names} == {"norm_embeds", "norm_features", "fc", "layer", "norm"}
    assert drafter.fc.in_features == 128 and drafter.fc.out_features == 64


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_incremental_equals_full_forward(adapter, attn):
    drafter = make_drafter(adapter)
    drafter.set_attn_implementation(attn)
    e, f = rows(2, 9)
    full = drafter(e, f)
    assert isinstance(full, DrafterOutput) and full.hidden.shape == (2, 9, 64) and full.past_key_values is None
    cache = drafter.new_cache()
    assert len(cache.layers) == 1
    outs = []
    for lo, hi in [(0, 4), (4, 5), (5, 9)]:
        out = drafter(e[:, lo:hi], f[:, lo:hi], past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        outs.append(out.hidden)
    assert cache.get_seq_length() == 9
    torch.testing.assert_close(torch.cat(outs, 1), full.hidden, atol=ATOL, rtol=0)
    # explicit positions == default positions
    torch.testing.assert_close(drafter(e, f, position_ids=torch.arange(9).expand(2, 9)).hidden, full.hidden)
    # RoPE is relative: a constant shift changes nothing, other relative distances do
    torch.testing.assert_close(
        drafter(e, f, position_ids=torch.arange(9).expand(2, 9) + 3).hidden, full.hidden, atol=ATOL, rtol=0
    )
    assert not torch.allclose(drafter(e, f, position_ids=torch.arange(9).expand(2, 9) * 2).hidden, full.hidden)


def test_use_cache_creates_cache(adapter):
    drafter = make_drafter(adapter)
    e, f = rows(1, 3)
    out = drafter(e, f, use_cache=True)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_mask_matches_root_to_node_paths(adapter, attn):
    drafter = make_drafter(adapter)
    drafter.set_attn_implementation(attn)
    p, n = 5, len(PARENTS)
    e, f = rows(1, p + n, seed=1)
    cache = drafter.new_cache()
    drafter(e[:, :p], f[:, :p], past_key_values=cache)
    mask, depth = tree_from_parents(PARENTS)
    mask4d = prefix_mask(mask, p, adapter.dtype, adapter.device)  # the decoder's convention: additive [1,1,n,p+n]
    out = drafter(e[:, p:], f[:, p:], position_ids=(p + depth)[None], attention_mask=mask4d, past_key_values=cache)
    assert cache.get_seq_length() == p + n
    for node in range(n):
        nodes = [p + i for i in root_path(PARENTS, node)]
        idx = list(range(p)) + nodes
        ref = drafter(e[:, idx], f[:, idx])  # plain causal forward over prefix + root-to-node path
        torch.testing.assert_close(out.hidden[0, node], ref.hidden[0, -1], atol=ATOL, rtol=0)
    # a bool mask (True = attend) gives the same result
    kv_cache.crop(cache, p)
    allowed = torch.cat([torch.ones(n, p, dtype=torch.bool), mask], 1)[None, None]
    out2 = drafter(e[:, p:], f[:, p:], position_ids=(p + depth)[None], attention_mask=allowed, past_key_values=cache)
    torch.testing.assert_close(out2.hidden, out.hidden, atol=ATOL, rtol=0)


def test_compact_and_crop_cache(adapter):
    drafter = make_drafter(adapter)
    p, n = 4, len(PARENTS)
    e, f = rows(1, p + n + 1, seed=2)
    cache = drafter.new_cache()
    drafter(e[:, :p], f[:, :p], past_key_values=cache)
    mask, depth = tree_from_parents(PARENTS)
    drafter(
        e[:, p : p + n],
        f[:, p : p + n],
        position_ids=(p + depth)[None],
        attention_mask=prefix_mask(mask, p, adapter.dtype, adapter.device),
        past_key_values=cache,
    )
    keep = torch.tensor(root_path(PARENTS, 7))  # accepted path 0 -> 2 -> 5 -> 7
    kv_cache.compact(cache, p, keep)
    assert cache.get_seq_length() == p + len(keep)
    nxt = drafter(e[:, -1:], f[:, -1:], past_key_values=cache)
    idx = list(range(p)) + [p + int(i) for i in keep] + [p + n]
    ref = drafter(e[:, idx], f[:, idx])
    torch.testing.assert_close(nxt.hidden[0, -1], ref.hidden[0, -1], atol=ATOL, rtol=0)
    kv_cache.crop(cache, 2)
    assert cache.get_seq_length() == 2


def test_padding_mask_batch_equals_unpadded(adapter):
    drafter = make_drafter(adapter)
    e, f = rows(2, 7, seed=3)
    lb = 4
    e[1, lb:], f[1, lb:] = 123.0, -55.0  # garbage in the padding must not leak
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, lb:] = 0
    out = drafter(e, f, attention_mask=mask)
    torch.testing.assert_close(out.hidden[0], drafter(e[:1], f[:1]).hidden[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[1, :lb], drafter(e[1:, :lb], f[1:, :lb]).hidden[0], atol=ATOL, rtol=0)
    # with a cache: padding mask covers past + new
    cache = drafter.new_cache()
    a = drafter(e[:, :3], f[:, :3], attention_mask=mask[:, :3], past_key_values=cache)
    b = drafter(e[:, 3:], f[:, 3:], attention_mask=mask, past_key_values=cache)
    torch.testing.assert_close(torch.cat([a.hidden, b.hidden], 1)[1, :lb], out.hidden[1, :lb], atol=ATOL, rtol=0)


def test_forward_validates_shapes(adapter):
    drafter = make_drafter(adapter)
    e, f = rows(1, 3)
    with pytest.raises(ValueError, match=r"\[B, T, H\]"):
        drafter(e, f[:, :2])
    with pytest.raises(ValueError, match="4D attention_mask"):
        drafter(e, f, attention_mask=torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="2D attention_mask"):
        drafter(e, f, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="hidden size"):
        drafter(e[..., :32], f[..., :32])


def test_end_to_end_with_target_and_compressor(adapter):
    """Target features -> build_draft_sequence with the drafter's compressor -> drafter -> target lm_head; training
    gradients reach fc, the decoder layer and the compressor's gate."""
    drafter = make_drafter(adapter, compressor={"type": "select"}).train()
    # 4x4 grid: prune10 -> 2, pool9 -> 4, conv4 -> 4, resampler2 -> 2, text_only -> 0; the max is reported
    grid = VisualLayout([("grid", 4, 4)])
    assert drafter.num_visual_tokens(grid) == 4
    assert make_drafter(adapter).num_visual_tokens(grid) == 16  # no compressor: every visual row
    ids, images = make_vlm_inputs(adapter, [(32, 32)], n_text=4, seed=0)
    feats = adapter.encode_images(images)
    out = adapter.forward(ids, image_features=feats)
    embeds = adapter.embed(ids, feats)
    torch.manual_seed(1)
    k = drafter.compressor.branch_names.index("conv4")
    with torch.no_grad():  # pick a branch that produces rows, so the loss reaches the gate
        drafter.compressor.gate.mlp[-1].bias.copy_(50.0 * torch.nn.functional.one_hot(torch.tensor(k), 5).float())
    layouts = adapter.layouts_of(images)
    assert [layout.segments for layout in layouts] == [[("grid", 4, 4)]]
    seq = build_draft_sequence(
        embeds[0], out.hidden[0], ids[0], adapter.visual_token_ids, compressor=drafter.compressor, layouts=layouts
    )
    assert seq.compressed.branch == k and seq.length == ids.shape[1] - 1 - 16 + 4
    pred = drafter(seq.embeds[None], seq.features[None]).hidden
    logits = adapter.lm_head(pred)
    assert logits.shape == (1, seq.length, adapter.vocab_size)
    loss = torch.nn.functional.smooth_l1_loss(pred[0, :-1], seq.features[1:]) + logits.logsumexp(-1).mean() * 0.1
    loss.backward()
    assert drafter.fc.weight.grad.abs().sum() > 0
    assert drafter.layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert drafter.compressor.gate.mlp[0].weight.grad.abs().sum() > 0
    assert drafter.compressor.branches["conv4"].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in adapter.model.parameters())  # the target stays frozen


# ------------------------------------------------------------------------------------------- save / load
def _same_outputs(a: EagleVLMDrafter, b: EagleVLMDrafter):
    e, f = rows(1, 6, seed=4)
    torch.testing.assert_close(a(e, f).hidden, b(e, f).hidden, atol=0, rtol=0)
    if a.compressor is None:
        return
    ev, fv = rows(1, 64, seed=5)
    q = rows(1, 3, seed=6)[1][0]
    branches = range(len(a.compressor.branches)) if isinstance(a.compressor, SelectCompressor) else [None]
    for branch in branches:
        if branch is not None:  # drive every branch through the (reloaded) gate
            with torch.no_grad():
                for c in (a, b):
                    c.compressor.gate.mlp[-1].bias.copy_(
                        50.0 * torch.nn.functional.one_hot(torch.tensor(branch), len(a.compressor.branches)).float()
                    )
        grid = VisualLayout([("grid", 8, 8)])
        x, y = a.compressor(ev[0], fv[0], grid, q), b.compressor(ev[0], fv[0], grid, q)
        assert x.branch == y.branch == branch
        torch.testing.assert_close(x.embeds, y.embeds, atol=0, rtol=0)
        torch.testing.assert_close(x.features, y.features, atol=0, rtol=0)


def test_save_pretrained_round_trip_with_compressor(adapter, tmp_path):
    drafter = make_drafter(adapter, compressor=ALL_BRANCHES)
    assert isinstance(drafter.compressor, SelectCompressor)
    drafter.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["model_type"] == "eagle_vlm" and config["compressor"]["branches"]["resampler"]["num_heads"] == 8
    assert config["target_fingerprint"] == adapter.fingerprint()
    loaded = EagleVLMDrafter.from_pretrained(tmp_path / "d").eval()
    assert loaded.config.compressor == drafter.config.compressor
    assert set(loaded.state_dict()) == set(drafter.state_dict())
    for k, v in drafter.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    _same_outputs(drafter, loaded)
    again = EagleVLMDrafter.load(tmp_path / "d", target=adapter)
    assert not again.training
    _same_outputs(drafter, again)


def test_save_atomically(adapter, tmp_path, monkeypatch):
    dest = tmp_path / "export" / "drafter"
    d1 = make_drafter(adapter, seed=1, compressor={"type": "conv", "ratio": 4})
    assert save_atomically(d1, dest) == dest.absolute()
    _same_outputs(d1, EagleVLMDrafter.load(dest, target=adapter))
    assert sorted(os.listdir(dest.parent)) == ["drafter"]  # no temp dirs left behind

    # overwriting an existing export
    d2 = make_drafter(adapter, seed=2, compressor={"type": "conv", "ratio": 4})
    save_atomically(d2, dest)
    _same_outputs(d2, EagleVLMDrafter.load(dest))
    assert sorted(os.listdir(dest.parent)) == ["drafter"]

    # an export interrupted mid-write leaves the previous export intact and nothing half-written
    def boom(self, save_directory, **kwargs):  # dies after writing part of the export
        with open(os.path.join(save_directory, "config.json"), "w") as fh:
            fh.write("{")
        raise KeyboardInterrupt

    monkeypatch.setattr(EagleVLMDrafter, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_atomically(make_drafter(adapter, seed=3), dest)
    monkeypatch.undo()
    _same_outputs(d2, EagleVLMDrafter.load(dest))
    assert sorted(os.listdir(dest.parent)) == ["drafter"]

    # refuses to replace a directory that is not a drafter export
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ForeignDirectoryError, match="not written by specvlm-lit"):
        save_atomically(d2, other)
    assert sorted(os.listdir(other)) == ["notes.txt"] and (other / "notes.txt").read_text() == "keep me"
    # nor the user's target checkpoint (a config.json of another model_type is not an export)
    (other / "notes.txt").unlink()
    (other / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ForeignDirectoryError):
        save_atomically(d2, other)
    assert json.loads((other / "config.json").read_text()) == {"model_type": "llava"}


def test_save_atomically_replaces_exports_of_older_versions(adapter, tmp_path):
    """Exports written before the publisher's marker file existed are recognised by their config.json."""
    dest = tmp_path / "d"
    save_atomically(make_drafter(adapter, seed=1), dest)
    (dest / MARKER).unlink()  # what an older version left
    check_export_path(dest)
    d2 = make_drafter(adapter, seed=2)
    save_atomically(d2, dest)
    _same_outputs(d2, EagleVLMDrafter.load(dest))
    assert (dest / MARKER).is_file()


# ---------------------------------------------------------------------------------------------- checks
def test_check_target_mismatches(adapter, tmp_path):
    drafter = make_drafter(adapter)
    drafter.check_target(adapter)  # OK

    wide = tiny_llava_config()
    wide.text_config.hidden_size, wide.text_config.intermediate_size = 32, 64
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    other_size = TargetAdapter(LlavaForConditionalGeneration(wide).eval())
    with pytest.raises(DrafterMismatchError, match="drafter has hidden size 64 but the target has 32: train a drafter"):
        drafter.check_target(other_size)

    retrained = TargetAdapter(build_tiny_llava(seed=1))  # same architecture, different weights
    with pytest.raises(DrafterMismatchError, match="fingerprint"):
        drafter.check_target(retrained)

    bigger_vocab = tiny_llava_config()
    bigger_vocab.text_config.vocab_size = 130
    torch.manual_seed(0)
    with pytest.raises(DrafterMismatchError, match="vocabulary size 120 but the target has 130"):
        drafter.check_target(TargetAdapter(LlavaForConditionalGeneration(bigger_vocab).eval()))

    save_atomically(drafter, tmp_path / "d")
    with pytest.raises(DrafterMismatchError):
        EagleVLMDrafter.load(tmp_path / "d", target=retrained)
    assert isinstance(DrafterMismatchError("x"), ValueError)

    # without a stored fingerprint only the sizes are checked
    loose = EagleVLMDrafter(EagleVLMConfig.from_target(adapter, target_fingerprint=None))
    loose.check_target(retrained)


def test_load_errors(adapter, tmp_path):
    with pytest.raises(DrafterLoadError, match="does not exist"):
        EagleVLMDrafter.load(tmp_path / "missing")
    drafter = make_drafter(adapter)
    d = save_atomically(drafter, tmp_path / "d")
    weights = d / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) - 100])  # truncated copy
    with pytest.raises(DrafterLoadError, match="model.safetensors") as err:
        EagleVLMDrafter.load(d)
    assert "truncated" in str(err.value)
    weights.write_bytes(data[:5])
    with pytest.raises(DrafterLoadError, match="model.safetensors"):
        EagleVLMDrafter.load(d)

    weights.unlink()
    with pytest.raises(DrafterLoadError, match="model.safetensors is missing"):
        EagleVLMDrafter.load(d)
    weights.write_bytes(data)
    EagleVLMDrafter.load(d)

    (d / "config.json").unlink()
    with pytest.raises(DrafterLoadError, match="config.json is missing"):
        EagleVLMDrafter.load(d)

    # a target checkpoint is not a drafter
    tdir = tmp_path / "target"
    adapter.model.save_pretrained(tdir)
    with pytest.raises(DrafterLoadError, match="model_type='llava'"):
        EagleVLMDrafter.load(tdir)

    # weights that do not match the config (e.g. compressor edited in config.json)
    d2 = save_atomically(make_drafter(adapter, compressor={"type": "conv", "ratio": 4}), tmp_path / "d2")
    cfg = json.loads((d2 / "config.json").read_text())
    cfg["compressor"] = {"type": "resampler", "num_queries": 2, "num_heads": 8}
    (d2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError, match="do not match"):
        EagleVLMDrafter.load(d2)


def test_for_target_initialises_final_norm_from_target(adapter):
    drafter = EagleVLMDrafter.for_target(adapter)
    torch.testing.assert_close(drafter.norm.weight, adapter.model.model.language_model.norm.weight)
    assert drafter.config.target_fingerprint == adapter.fingerprint()
    no_norm = EagleVLMDrafter.for_target(adapter, final_norm=False)
    assert no_norm.norm is None and "norm.weight" not in no_norm.state_dict()
