"""Tests for :mod:`specvlm_lit.target`.

The parity checks are plain functions ``check_*(case)`` taking a :class:`TargetCase` (an adapter plus a way to make
prompts), so another test module can run the very same checks against a different target by building its own
``TargetCase`` (or by adding a builder to ``TARGET_BUILDERS``). All models are tiny and random-initialised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from specvlm_lit import kv_cache
from specvlm_lit.attention_masks import additive_mask, as_additive, causal_mask, prefix_mask
from specvlm_lit.target import (
    TargetAdapter,
    TargetLoadError,
    TargetOutput,
    encode_by_size,
    image_list,
    llava_visual_grid,
    visual_token_counter,
)

IMAGE_TOKEN_ID = 100
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------- builders
def tiny_llava_config(**overrides) -> LlavaConfig:
    """LLaVA-1.5-shaped config (CLIP tower, feature layer -2, CLS dropped, 2-layer GELU projector), but tiny."""
    kwargs = dict(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=120,
            max_position_embeddings=512,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    kwargs.update(overrides)
    return LlavaConfig(**kwargs)


def build_tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def make_vlm_inputs(
    adapter: TargetAdapter, image_sizes: list[tuple[int, int]], n_text: int = 5, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Generic prompt ``text, (image placeholders, text)*`` for any adapter: ``input_ids [1, T]`` + images.

    Text tokens avoid the image token id; each image expands to ``adapter.num_visual_tokens(h, w)`` placeholders.
    """
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> list[int]:
        ids = torch.randint(0, adapter.vocab_size - 1, (n,), generator=g)
        ids[ids >= adapter.image_token_id] += 1  # skip the image token id
        return ids.tolist()

    ids = text(n_text)
    images = []
    for h, w in image_sizes:
        images.append(torch.randn(3, h, w, generator=g))
        ids += [adapter.image_token_id] * adapter.num_visual_tokens(h, w) + text(n_text)
    return torch.tensor([ids]), images


@dataclass
class TargetCase:
    adapter: TargetAdapter
    make_inputs: Callable[..., tuple[torch.Tensor, list[torch.Tensor]]]  # (adapter, image_sizes, n_text, seed)
    native_size: tuple[int, int]  # an image size the tower takes without interpolation

    def inputs(self, image_sizes=None, n_text: int = 5, seed: int = 0):
        sizes = [self.native_size] if image_sizes is None else image_sizes
        return self.make_inputs(self.adapter, sizes, n_text, seed)

    def text_ids(self, n: int, seed: int) -> torch.Tensor:
        """``[1, n]`` plain text tokens (no image token)."""
        ids, _ = self.make_inputs(self.adapter, [], n, seed)
        return ids


def _tiny_llava_case() -> TargetCase:
    return TargetCase(TargetAdapter(build_tiny_llava()), make_vlm_inputs, native_size=(32, 32))


def _embedded_case() -> TargetCase:
    """The project's committed embedded target: the same parity checks must hold on it."""
    from tests.conftest import EMBEDDED_TARGET

    if not (EMBEDDED_TARGET / "config.json").is_file():
        pytest.skip("embedded target not built: python -m recipes.embedded_target.build")
    adapter = TargetAdapter.from_pretrained(EMBEDDED_TARGET)
    size = adapter.config.vision_config.image_size
    return TargetCase(adapter, make_vlm_inputs, native_size=(size, size))


TARGET_BUILDERS: dict[str, Callable[[], TargetCase]] = {"tiny_llava": _tiny_llava_case, "embedded": _embedded_case}


@pytest.fixture(params=sorted(TARGET_BUILDERS))
def case(request) -> TargetCase:
    return TARGET_BUILDERS[request.param]()


@pytest.fixture
def tiny_llava_dir(tmp_path):
    model = build_tiny_llava()
    path = tmp_path / "tiny_llava"
    model.save_pretrained(path)
    return path


def _set_attn(adapter: TargetAdapter, attn: str) -> None:
    adapter.model.set_attn_implementation(attn)
    assert adapter.model.model.language_model.config._attn_implementation == attn


def _tree(parents: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor-or-self mask ``[n, n]`` and depths ``[n]`` for a tree given by parent indices (-1 = root)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.long)
    for i, p in enumerate(parents):
        assert p < i, "parents must precede children"
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, depth


def _path(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


# ---------------------------------------------------------------------------------------- reusable checks
def check_forward_matches_hf(case: TargetCase) -> None:
    adapter, model = case.adapter, case.adapter.model
    input_ids, images = case.inputs([case.native_size, case.native_size])
    pixel_values = torch.stack(images)
    ref = model(input_ids=input_ids, pixel_values=pixel_values).logits
    out = adapter.forward(input_ids, pixel_values=pixel_values)
    assert isinstance(out, TargetOutput)
    assert out.logits.shape == (1, input_ids.shape[1], adapter.vocab_size)
    assert out.hidden.shape == (1, input_ids.shape[1], adapter.hidden_size)
    assert out.past_key_values is None
    torch.testing.assert_close(out.logits, ref, atol=ATOL, rtol=0)
    # Pre-encoded images give the same result.
    out2 = adapter.forward(input_ids, image_features=adapter.encode_images(pixel_values))
    torch.testing.assert_close(out2.logits, ref, atol=ATOL, rtol=0)


def check_right_padded_batch(case: TargetCase) -> None:
    adapter, model = case.adapter, case.adapter.model
    ids_a, img_a = case.inputs(n_text=6, seed=1)
    ids_b, img_b = case.inputs(n_text=3, seed=2)
    la, lb = ids_a.shape[1], ids_b.shape[1]
    batch = torch.zeros(2, la, dtype=torch.long)
    batch[0], batch[1, :lb] = ids_a[0], ids_b[0]
    mask = torch.zeros(2, la, dtype=torch.long)
    mask[0], mask[1, :lb] = 1, 1
    pixel_values = torch.stack(img_a + img_b)
    out = adapter.forward(batch, attention_mask=mask, pixel_values=pixel_values)
    ref = model(input_ids=batch, attention_mask=mask, pixel_values=pixel_values).logits
    torch.testing.assert_close(out.logits[0], ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.logits[1, :lb], ref[1, :lb], atol=ATOL, rtol=0)
    # Padding does not leak into the valid positions.
    single = adapter.forward(ids_b, pixel_values=img_b)
    torch.testing.assert_close(out.logits[1, :lb], single.logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[1, :lb], single.hidden[0], atol=ATOL, rtol=0)


def check_hidden_feeds_lm_head(case: TargetCase) -> None:
    adapter = case.adapter
    input_ids, images = case.inputs()
    out = adapter.forward(input_ids, pixel_values=images)
    torch.testing.assert_close(adapter.lm_head(out.hidden), out.logits, atol=ATOL, rtol=0)
    last = adapter.forward(input_ids, pixel_values=images, logits_to_keep=1)
    assert last.logits.shape[1] == 1 and last.hidden.shape == out.hidden.shape
    torch.testing.assert_close(last.logits[:, 0], out.logits[:, -1], atol=ATOL, rtol=0)
    assert not out.hidden.requires_grad and not out.logits.requires_grad


def check_greedy_matches_hf_generate(case: TargetCase, image_sizes, steps: int = 5) -> None:
    """HF ``generate`` fed the adapter's pre-encoded images == the adapter's own cached greedy loop."""
    adapter, model = case.adapter, case.adapter.model
    input_ids, images = case.inputs(image_sizes, seed=3)
    feats = adapter.encode_images(images)

    gen_cfg = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        mm_encoder_outputs=adapter.as_mm_encoder_outputs(feats),
        generation_config=gen_cfg,
    )[0, input_ids.shape[1] :]

    cache = adapter.new_cache()
    out = adapter.forward(input_ids, image_features=feats, past_key_values=cache, use_cache=True, logits_to_keep=1)
    assert out.past_key_values is cache and cache.get_seq_length() == input_ids.shape[1]
    generated = []
    for _ in range(steps):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(int(tok))
        out = adapter.forward(tok, past_key_values=cache, use_cache=True)
    assert ref.tolist() == generated


def _prefix_cache(case: TargetCase, seed: int = 0):
    adapter = case.adapter
    prefix_ids, images = case.inputs(seed=seed)
    feats = adapter.encode_images(images)
    cache = adapter.new_cache()
    adapter.forward(prefix_ids, image_features=feats, past_key_values=cache, use_cache=True)
    return prefix_ids, feats, cache


def check_causal_tree_equals_full_forward(case: TargetCase, attn: str) -> None:
    adapter = case.adapter
    _set_attn(adapter, attn)
    prefix_ids, feats, cache = _prefix_cache(case)
    p, n = prefix_ids.shape[1], 6
    new = case.text_ids(n, seed=11)
    tree = adapter.tree_forward(new, torch.arange(p, p + n)[None], torch.ones(n, n, dtype=torch.bool).tril(), cache)
    assert cache.get_seq_length() == p + n
    full = adapter.forward(torch.cat([prefix_ids, new], 1), image_features=feats)
    torch.testing.assert_close(tree.logits, full.logits[:, p:], atol=ATOL, rtol=0)
    torch.testing.assert_close(tree.hidden, full.hidden[:, p:], atol=ATOL, rtol=0)


# A branching draft tree: 0 -> {1, 2}; 1 -> 3; 2 -> {4, 5}; 3 -> 6; 5 -> 7
PARENTS = [-1, 0, 0, 1, 2, 2, 3, 5]


def check_branching_tree_matches_paths(case: TargetCase, attn: str) -> None:
    adapter = case.adapter
    _set_attn(adapter, attn)
    prefix_ids, feats, cache = _prefix_cache(case)
    p = prefix_ids.shape[1]
    mask, depth = _tree(PARENTS)
    tokens = case.text_ids(len(PARENTS), seed=12)
    tree = adapter.tree_forward(tokens, (p + depth)[None], mask, cache)
    for node in range(len(PARENTS)):
        path = _path(PARENTS, node)
        ref = adapter.forward(torch.cat([prefix_ids, tokens[:, path]], 1), image_features=feats, logits_to_keep=1)
        torch.testing.assert_close(tree.logits[0, node], ref.logits[0, -1], atol=ATOL, rtol=0)
        torch.testing.assert_close(tree.hidden[0, node], ref.hidden[0, -1], atol=ATOL, rtol=0)


def check_compaction_leaves_no_trace(case: TargetCase) -> None:
    adapter = case.adapter
    prefix_ids, feats, cache = _prefix_cache(case)
    p = prefix_ids.shape[1]
    mask, depth = _tree(PARENTS)
    tokens = case.text_ids(len(PARENTS), seed=13)
    adapter.tree_forward(tokens, (p + depth)[None], mask, cache)
    path = _path(PARENTS, 7)  # [0, 2, 5, 7]
    assert kv_cache.compact(cache, p, torch.tensor(path)) is cache
    assert cache.get_seq_length() == p + len(path)

    # Reference: a fresh cache from a plain forward over prefix + accepted path.
    seq = torch.cat([prefix_ids, tokens[:, path]], 1)
    fresh = adapter.new_cache()
    adapter.forward(seq, image_features=feats, past_key_values=fresh, use_cache=True)
    for got, want in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=ATOL, rtol=0)

    nxt = case.text_ids(1, seed=14)
    step = adapter.forward(nxt, past_key_values=cache, use_cache=True)
    ref = adapter.forward(torch.cat([seq, nxt], 1), image_features=feats, logits_to_keep=1)
    torch.testing.assert_close(step.logits[:, -1], ref.logits[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step.hidden[:, -1], ref.hidden[:, -1], atol=ATOL, rtol=0)

    # crop rolls back to the prefix; stepping from there equals a forward over prefix + token.
    kv_cache.crop(cache, p)
    assert cache.get_seq_length() == p
    step = adapter.forward(nxt, past_key_values=cache, use_cache=True)
    ref = adapter.forward(torch.cat([prefix_ids, nxt], 1), image_features=feats, logits_to_keep=1)
    torch.testing.assert_close(step.logits[:, -1], ref.logits[:, -1], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------- tests
def test_forward_matches_hf(case):
    check_forward_matches_hf(case)


def test_right_padded_batch(case):
    check_right_padded_batch(case)


def test_hidden_feeds_lm_head(case):
    check_hidden_feeds_lm_head(case)


def test_greedy_loop_matches_hf_generate_variable_resolution(case):
    check_greedy_matches_hf_generate(case, [(16, 16), (32, 32)])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_causal_tree_forward_equals_full_forward(case, attn):
    check_causal_tree_equals_full_forward(case, attn)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_branching_tree_matches_root_to_node_paths(case, attn):
    check_branching_tree_matches_paths(case, attn)


def test_compaction_leaves_no_trace(case):
    check_compaction_leaves_no_trace(case)


# ------------------------------------------------------------------------------------ LLaVA-specific tests
@pytest.fixture
def adapter() -> TargetAdapter:
    return TargetAdapter(build_tiny_llava())


def test_adapter_freezes_model_and_exposes_properties(adapter):
    assert not adapter.model.training
    assert all(not p.requires_grad for p in adapter.model.parameters())
    assert adapter.hidden_size == 64 and adapter.vocab_size == 120 and adapter.num_layers == 2
    assert adapter.image_token_id == IMAGE_TOKEN_ID
    assert adapter.dtype == torch.float32 and adapter.device.type == "cpu"
    assert adapter.embed_tokens is adapter.model.get_input_embeddings()
    assert adapter.lm_head is adapter.model.lm_head
    assert adapter.text_config.hidden_size == 64 and adapter.config.model_type == "llava"
    cache = adapter.new_cache()
    assert cache.get_seq_length() == 0 and len(cache.layers) == adapter.num_layers


def test_encode_images_variable_resolution(adapter):
    torch.manual_seed(0)
    small, big = torch.randn(3, 16, 16), torch.randn(3, 32, 32)
    feats = adapter.encode_images([small, big[None]])
    assert [tuple(f.shape) for f in feats] == [(4, 64), (16, 64)]
    assert adapter.num_visual_tokens(16, 16) == 4 and adapter.num_visual_tokens(32, 32) == 16
    assert adapter.num_visual_tokens(24, 40) == 15
    # Native size: identical to HF's own image path (no interpolation).
    ref = adapter.model.model.get_image_features(pixel_values=big[None]).pooler_output[0]
    torch.testing.assert_close(feats[1], ref, atol=ATOL, rtol=0)
    # Grouping same-size images into one tower call does not change results, and order is preserved.
    other = torch.randn(3, 16, 16)
    mixed = adapter.encode_images([small, big, other])
    torch.testing.assert_close(mixed[0], feats[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], feats[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(mixed[2], adapter.encode_images(other[None])[0], atol=ATOL, rtol=0)
    # Non-square, non-native size.
    assert adapter.encode_images(torch.randn(1, 3, 24, 40))[0].shape == (15, 64)


def test_encode_by_size_keeps_order_and_batches_equal_sizes():
    images = [torch.full((3, 8, 8), 1.0), torch.full((1, 3, 4, 8), 2.0), torch.full((3, 8, 8), 3.0)]
    calls = []

    def encode(batch):  # one "feature" per image: its mean value, tagged with the batch it came in
        calls.append(tuple(batch.shape))
        return [img.mean().reshape(1) for img in batch]

    assert [float(f) for f in encode_by_size(images, encode)] == [1.0, 2.0, 3.0]
    assert calls == [(2, 3, 8, 8), (1, 3, 4, 8)]
    with pytest.raises(ValueError, match=r"\[3,h,w\] or \[k,3,h,w\]"):
        image_list([torch.zeros(8, 8)])


def test_visual_token_counter_matches_the_adapter(adapter):
    class Processor:  # the LlavaProcessor attributes the counter reads
        patch_size = adapter.config.vision_config.patch_size
        vision_feature_select_strategy = "default"

    count = visual_token_counter(Processor())
    for h, w in [(16, 16), (24, 40), (32, 32)]:
        rows, cols = adapter.visual_grid(h, w)
        assert count(h, w) == adapter.num_visual_tokens(h, w) == rows * cols
    assert adapter.visual_grid(24, 40) == (3, 5)
    Processor.vision_feature_select_strategy = "full"  # the CLS token is kept: one more token, no plain grid
    assert visual_token_counter(Processor())(24, 40) == 16 and llava_visual_grid(24, 40, 8, "full") is None
    with pytest.raises(TargetLoadError, match="no patch_size"):
        visual_token_counter(object())


def test_encode_images_without_interpolation_rejects_other_sizes():
    adapter = TargetAdapter(build_tiny_llava(), interpolate_pos_encoding=False)
    assert adapter.encode_images(torch.randn(1, 3, 32, 32))[0].shape == (16, 64)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        adapter.encode_images(torch.randn(1, 3, 16, 16))


def test_embed_checks_image_token_count(adapter):
    ids, images = make_vlm_inputs(adapter, [(16, 16)])
    feats = adapter.encode_images(images)
    emb = adapter.embed(ids, feats)
    pos = (ids[0] == IMAGE_TOKEN_ID).nonzero()[:, 0]
    torch.testing.assert_close(emb[0, pos], feats[0])
    with pytest.raises(ValueError, match="4 visual tokens.*16 feature vectors"):
        adapter.embed(ids, adapter.encode_images([torch.randn(3, 32, 32)]))
    with pytest.raises(ValueError, match="either image_features or pixel_values"):
        adapter.forward(ids, image_features=feats, pixel_values=images)


def test_tree_forward_validates_inputs(adapter):
    cache = adapter.new_cache()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="diagonal"):
        adapter.tree_forward(ids, torch.arange(3)[None], torch.zeros(3, 3, dtype=torch.bool), cache)
    with pytest.raises(ValueError, match="tree_mask must have shape"):
        adapter.tree_forward(ids, torch.arange(3)[None], torch.ones(2, 2, dtype=torch.bool), cache)


def test_attention_masks():
    mask4d = prefix_mask(torch.eye(3, dtype=torch.bool), 2, torch.bfloat16, "cpu")
    assert mask4d.shape == (1, 1, 3, 5) and mask4d.dtype == torch.bfloat16
    assert (mask4d[0, 0, :, :2] == 0).all() and mask4d[0, 0, 0, 3] == torch.finfo(torch.bfloat16).min
    assert (mask4d[0, 0, :, 2:] == 0).equal(torch.eye(3, dtype=torch.bool))
    causal = causal_mask(3, 2, torch.float32, "cpu")[0, 0] == 0
    assert causal.equal(torch.arange(5)[None, :] <= torch.arange(2, 5)[:, None])
    # An fp32 mask cast to bf16 stays finite (finfo.min of fp32 would round to -inf), a bool one becomes additive.
    fp32 = additive_mask(torch.eye(2, dtype=torch.bool), torch.float32)
    assert torch.isfinite(as_additive(fp32, torch.bfloat16)).all()
    assert as_additive(torch.eye(2, dtype=torch.bool), torch.float32).equal(fp32)
    with pytest.raises(ValueError, match="additive float"):
        as_additive(torch.ones(2, 2, dtype=torch.long), torch.float32)


def test_compact_cache_rejects_out_of_range(adapter):
    cache = adapter.new_cache()
    adapter.forward(torch.tensor([[1, 2, 3, 4]]), past_key_values=cache, use_cache=True)
    with pytest.raises(IndexError, match="out of range"):
        kv_cache.compact(cache, 2, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="cannot crop"):
        kv_cache.crop(cache, 5)


# --------------------------------------------------------------------------------------- loading errors
def test_from_pretrained_roundtrip(tiny_llava_dir):
    loaded = TargetAdapter.from_pretrained(tiny_llava_dir)
    reference = TargetAdapter(build_tiny_llava())
    assert loaded.fingerprint() == reference.fingerprint()
    ids, images = make_vlm_inputs(loaded, [(32, 32)])
    torch.testing.assert_close(
        loaded.forward(ids, pixel_values=images).logits, reference.forward(ids, pixel_values=images).logits
    )
    eager = TargetAdapter.from_pretrained(tiny_llava_dir, attn_implementation="eager")
    assert eager.model.model.language_model.config._attn_implementation == "eager"


def test_missing_directory(tmp_path):
    with pytest.raises(TargetLoadError, match="does not exist"):
        TargetAdapter.from_pretrained(tmp_path / "nope")


def test_missing_config(tiny_llava_dir):
    (tiny_llava_dir / "config.json").unlink()
    with pytest.raises(TargetLoadError, match=r"config\.json is missing"):
        TargetAdapter.from_pretrained(tiny_llava_dir)


def test_invalid_config_json(tiny_llava_dir):
    (tiny_llava_dir / "config.json").write_text("{not json")
    with pytest.raises(TargetLoadError, match="not valid JSON"):
        TargetAdapter.from_pretrained(tiny_llava_dir)


def test_missing_weights(tiny_llava_dir):
    (tiny_llava_dir / "model.safetensors").unlink()
    with pytest.raises(TargetLoadError, match="No model weights.*model.safetensors"):
        TargetAdapter.from_pretrained(tiny_llava_dir)


def test_truncated_safetensors(tiny_llava_dir):
    weights = tiny_llava_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TargetLoadError, match="model.safetensors.*truncated or corrupt") as info:
        TargetAdapter.from_pretrained(tiny_llava_dir)
    assert "save_pretrained" in str(info.value) or "Re-download" in str(info.value)


def test_missing_shard(tiny_llava_dir):
    (tiny_llava_dir / "model.safetensors").rename(tiny_llava_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tiny_llava_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TargetLoadError, match="model-00002-of-00002.safetensors.*missing"):
        TargetAdapter.from_pretrained(tiny_llava_dir)


def test_unsupported_model_type(tiny_llava_dir):
    config_file = tiny_llava_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = "bert"
    config_file.write_text(json.dumps(config))
    with pytest.raises(TargetLoadError, match="model_type='bert'.*supported: llava"):
        TargetAdapter.from_pretrained(tiny_llava_dir)


def test_wrong_model_class_rejected():
    from transformers import LlamaForCausalLM

    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        TargetAdapter(
            LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
                )
            )
        )


# ---------------------------------------------------------------------------------------------- tokenizer
def _tokenizer(vocab_size: int, image_token: str | None = "<image>", image_id: int | None = None):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    if image_token is not None:
        old = next(k for k, v in vocab.items() if v == image_id)
        del vocab[old]
        vocab[image_token] = image_id
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_check_tokenizer(adapter):
    adapter.check_tokenizer(_tokenizer(110, image_id=IMAGE_TOKEN_ID))  # matching: no error
    with pytest.raises(TargetLoadError, match="Tokenizer has 150 tokens.*only 120 rows.*tokenizer saved with"):
        adapter.check_tokenizer(_tokenizer(150, image_id=IMAGE_TOKEN_ID))
    with pytest.raises(TargetLoadError, match="lacks the image token '<image>'.*image_token_id=100"):
        adapter.check_tokenizer(_tokenizer(110, image_token=None))
    with pytest.raises(TargetLoadError, match="id 42 .*image_token_id=100.*tokenizer saved with"):
        adapter.check_tokenizer(_tokenizer(110, image_id=42))


# -------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_stability_and_difference(tiny_llava_dir):
    a = TargetAdapter(build_tiny_llava(seed=0))
    fp = a.fingerprint()
    assert isinstance(fp, str) and len(fp) == 16
    assert fp == a.fingerprint() == TargetAdapter(build_tiny_llava(seed=0)).fingerprint()
    # Same checkpoint loaded in bf16: same target identity.
    assert TargetAdapter.from_pretrained(tiny_llava_dir, dtype=torch.bfloat16).fingerprint() == fp
    assert TargetAdapter(build_tiny_llava(seed=1)).fingerprint() != fp
    with torch.no_grad():
        a.lm_head.weight[3, 5] += 0.5
    assert a.fingerprint() != fp
    other_token = TargetAdapter(LlavaForConditionalGeneration(tiny_llava_config(image_token_id=101)))
    assert other_token.fingerprint() != fp


def test_forward_returns_the_inputs_embeds_it_used(case):
    adapter = case.adapter
    input_ids, images = case.inputs()
    feats = adapter.encode_images(images)
    out = adapter.forward(input_ids, image_features=feats)
    torch.testing.assert_close(out.inputs_embeds, adapter.embed(input_ids, feats))
