"""Tests for :mod:`specvlm_lit.export`: serving-format export / import of EAGLE-3 drafters (tiny random target).

The field and weight names asserted here are those of SERVING_FORMATS.md (speculators 0.9.0 / SpecForge 0.2.0 /
vLLM). ``test_speculators_loads_export`` runs the real ``speculators`` package from its own environment when it exists
(scripts/check_speculators.py); it is skipped, with the reason, otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from specvlm_lit.drafter.base import load_drafter, save_atomically
from specvlm_lit.drafter.eagle import EagleVLMDrafter
from specvlm_lit.drafter.eagle3 import Eagle3VLMDrafter
from specvlm_lit.export import ExportError, ImportCheckpointError, export_drafter, import_checkpoint
from specvlm_lit.export.__main__ import main as cli
from tests.test_speculative import get_target

REPO = Path(__file__).resolve().parents[1]
SPEC_ENV = Path(os.environ.get("SPECULATORS_ENV", "/work/speculators-env"))


@pytest.fixture(scope="module")
def adapter():
    return get_target("b")  # 3 layers: three distinct aux layers, as the serving formats need


@pytest.fixture(scope="module")
def drafter_dir(adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("e3")
    adapter.model.save_pretrained(root / "target")  # the verifier path the speculators format records
    torch.manual_seed(0)
    d = Eagle3VLMDrafter.for_target(adapter, draft_vocab_size=48, target_name_or_path=str(root / "target")).eval()
    d.set_draft_vocab(torch.arange(0, 96, 2), target=adapter)
    with torch.no_grad():  # non-trivial norms, so a mixed-up norm would show in the forward comparison
        for name, p in d.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.rand_like(p))
    return save_atomically(d, root / "drafter")


def _keys(path: Path) -> dict[str, tuple]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _same_forward(a, b, adapter):
    ids = torch.randint(4, adapter.vocab_size, (1, 9))
    out = adapter.forward(ids, hidden_layers=a.hidden_layers)
    with torch.no_grad():
        ha = a(out.inputs_embeds, a.project_features(out)).hidden
        hb = b(out.inputs_embeds, b.project_features(out)).hidden
        torch.testing.assert_close(ha, hb)
        torch.testing.assert_close(a.draft_logprobs(ha, adapter), b.draft_logprobs(hb, adapter))


def test_speculators_layout(drafter_dir, adapter, tmp_path):
    out = export_drafter(drafter_dir, tmp_path / "spec", "speculators", speculative_tokens=4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    sc = cfg["speculators_config"]
    assert sc["default_proposal_method"] == sc["proposal_methods"][0]["proposal_type"] == "greedy"
    assert sc["proposal_methods"][0]["speculative_tokens"] == 4
    assert cfg["norm_before_residual"] is False and cfg["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2]
    assert cfg["draft_vocab_size"] == 48 and cfg["target_hidden_size"] is None
    layer = cfg["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1 and "rope_theta" in layer
    H, V = adapter.hidden_size, adapter.vocab_size
    keys = _keys(out)
    assert keys["fc.weight"] == (H, 3 * H) and keys["lm_head.weight"] == (48, H)
    assert keys["layers.0.self_attn.q_proj.weight"][1] == 2 * H and keys["layers.0.self_attn.o_proj.weight"][0] == H
    assert keys["d2t"] == (48,) and keys["t2d"] == (V,)
    assert {"layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "norm.weight"} <= set(keys)
    assert not any(k.startswith("compressor.") or k == "fc.bias" for k in keys)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert ((torch.arange(48) + d2t) == torch.arange(0, 96, 2)).all() and int(t2d.sum()) == 48


@pytest.mark.parametrize("fmt", ["speculators", "sglang"])
def test_round_trip_import(fmt, drafter_dir, adapter, tmp_path):
    out = export_drafter(drafter_dir, tmp_path / fmt, fmt)
    if fmt == "sglang":
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 48
        assert any(k.startswith("midlayer.") for k in _keys(out)) and "embed_tokens.weight" not in _keys(out)
    back = import_checkpoint(out, adapter, tmp_path / f"{fmt}-imported")
    imported, original = load_drafter(back, target=adapter), load_drafter(drafter_dir)
    assert imported.config.image_rows == "visual"  # recorded by our export, restored
    _same_forward(original, imported, adapter)


def test_refusals_leave_nothing(adapter, tmp_path, drafter_dir):
    pooled = Eagle3VLMDrafter.for_target(adapter, compressor={"type": "pool", "ratio": 4})
    comp = save_atomically(pooled, tmp_path / "c")
    e2 = save_atomically(EagleVLMDrafter.for_target(adapter), tmp_path / "e2")
    for src, fmt, match in (
        (comp, "speculators", "visual compressor"),
        (comp, "sglang", "visual compressor"),
        (e2, "speculators", "EAGLE-2 style"),
        (e2, "eagle", "cannot be folded"),
        (drafter_dir, "eagle", "eagle3"),
        (
            save_atomically(Eagle3VLMDrafter.for_target(adapter, hidden_layers=[1, 1, 2]), tmp_path / "r"),
            "sglang",
            "distinct",
        ),
    ):
        with pytest.raises(ExportError, match=match):
            export_drafter(src, tmp_path / "out", fmt)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert cli([str(comp), "--format", "speculators", "--out", str(tmp_path / "out")]) == 2
    anonymous = save_atomically(Eagle3VLMDrafter.for_target(adapter), tmp_path / "anon")  # no recorded target
    with pytest.raises(ExportError, match="--verifier"):
        export_drafter(anonymous, tmp_path / "out", "speculators")
    assert export_drafter(anonymous, tmp_path / "out", "speculators", verifier="org/target").is_dir()


def test_import_mismatch_names_both_values(adapter, drafter_dir, tmp_path):
    out = export_drafter(drafter_dir, tmp_path / "spec", "speculators")
    other = adapter
    cfg = json.loads((out / "config.json").read_text())
    cfg["transformer_layer_config"]["vocab_size"] = 999
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportCheckpointError, match="vocab_size is 999 but the target's vocabulary size is 120"):
        import_checkpoint(out, other, tmp_path / "y")
    cfg["transformer_layer_config"]["vocab_size"] = 120
    cfg["transformer_layer_config"]["hidden_size"] = 32
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ImportCheckpointError, match="hidden_size is 32 but the target's hidden size is 64"):
        import_checkpoint(out, other, tmp_path / "y")
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ImportCheckpointError, match="neither a speculators"):
        import_checkpoint(out, other, tmp_path / "y")
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(
    not (SPEC_ENV / "bin" / "python").is_file(),
    reason=f"no speculators environment at {SPEC_ENV} (create it as docs/serving.md says, or set SPECULATORS_ENV)",
)
def test_speculators_loads_export(adapter, drafter_dir, tmp_path):
    """The speculators package (its own venv) loads the export and its forward matches ours on the same inputs,
    for 3 training-time-test steps (pruned vocabulary, non-trivial norms)."""
    out = export_drafter(drafter_dir, tmp_path / "spec", "speculators")
    script = REPO / "scripts" / "check_speculators.py"
    r = subprocess.run(
        [sys.executable, str(script), str(drafter_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "SPECULATORS_ENV": str(SPEC_ENV)},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "MATCH" in r.stdout
