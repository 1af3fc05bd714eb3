"""Serving formats of EAGLE-3 drafters: this project's drafter <-> speculators ``eagle3`` / SGLang (SpecForge) layouts.

Facts (field names, weight names, traps) are those of ``SERVING_FORMATS.md`` (checked against speculators 0.9.0,
SpecForge 0.2.0 and vLLM's loaders). The project's transformers pin conflicts with those packages, so the files are
written here directly: ``config.json`` with :mod:`json`, ``model.safetensors`` with :mod:`safetensors`, into a
temporary directory that is renamed into place (:func:`~specvlm_lit.utils.atomic.atomic_directory`), so a refused or
failed export never leaves a half-written directory.

Compressor drafters are refused, not exported without their compressor: no serving engine runs a visual
compressor for the draft (vLLM attends over every visual row), and a drafter trained on compressed visual rows at
shifted positions would run off its training distribution on every image prompt there, with an acceptance nobody
measured. A drafter for a serving engine is trained compressor-free (``drafter=eagle3 compressor=none``), which is
one config choice; see docs/serving.md.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..drafter.base import DraftModel, load_drafter, save_atomically
from ..drafter.eagle3 import Eagle3VLMDrafter, default_hidden_layers
from ..errors import UserError
from ..target import TargetAdapter
from ..utils.atomic import atomic_directory

__all__ = ["FORMATS", "ExportError", "ImportCheckpointError", "export_drafter", "import_checkpoint"]

FORMATS = ("speculators", "sglang", "eagle")
SPECULATORS_VERSION = "0.9.0"  # the release the layout was checked against
_KIND = "serving export"


class ExportError(UserError):
    """The drafter cannot be written in the requested format (the message says what the format cannot hold)."""


class ImportCheckpointError(UserError):
    """A serving-format checkpoint cannot be imported for the given target."""


# ------------------------------------------------------------------------------------------------ export
def _refuse_unless_servable(drafter: DraftModel, fmt: str, source: Path) -> Eagle3VLMDrafter:
    if not isinstance(drafter, Eagle3VLMDrafter):
        raise ExportError(
            f"{source} is a {drafter.config.model_type} (EAGLE-2 style) drafter; the {fmt} format holds EAGLE-3 heads "
            f"only (its per-half input norms, fc bias and 2H-wide fc map onto no serving draft head). Train an "
            f"EAGLE-3 drafter for serving: python train.py drafter=eagle3 compressor=none"
        )
    if drafter.compressor is not None:
        raise ExportError(
            f"{source} has a visual compressor ({drafter.config.compressor['type']}); serving engines run none (they "
            f"feed the draft every visual row), so this drafter would run off its training distribution there. "
            f"Train the compressor-free variant for serving: python train.py drafter=eagle3 compressor=none"
        )
    if len(set(drafter.config.hidden_layers)) != len(drafter.config.hidden_layers):
        raise ExportError(
            f"{source} fuses target layers {drafter.config.hidden_layers}; the {fmt} format needs distinct layer ids "
            f"(speculators and vLLM refuse repeated ones): retrain with drafter.hidden_layers=[low,mid,high]"
        )
    if len(drafter.config.hidden_layers) != 3:
        raise ExportError(
            f"{source} fuses {len(drafter.config.hidden_layers)} target layers; the {fmt} format's fc takes exactly 3 "
            f"(drafter.hidden_layers=[low,mid,high])"
        )
    return drafter


def _rope(cfg) -> tuple[dict, float, dict | None]:
    rope = copy.deepcopy(cfg.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    theta = float(rope.get("rope_theta", 10000.0))
    scaling = None if rope.get("rope_type", "default") == "default" else {k: v for k, v in rope.items()}
    return rope, theta, scaling


def _llama_fields(cfg, num_layers: int) -> dict[str, Any]:
    rope, theta, scaling = _rope(cfg)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": int(cfg.hidden_size),
        "intermediate_size": int(cfg.intermediate_size),
        "num_hidden_layers": int(num_layers),
        "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(cfg.num_key_value_heads),
        "head_dim": int(cfg.head_dim),
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "max_position_embeddings": int(cfg.max_position_embeddings),
        "vocab_size": int(cfg.vocab_size),
        "rope_parameters": rope,
        "rope_theta": theta,  # mirrored for readers older than transformers 5's rope_parameters
        "rope_scaling": scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": float(cfg.initializer_range),
        "torch_dtype": "float32",
    }


def _target_architectures(cfg) -> list[str]:
    path = cfg.target_name_or_path
    if path and (Path(path) / "config.json").is_file():
        try:
            return list(json.loads((Path(path) / "config.json").read_text()).get("architectures") or [])
        except (OSError, ValueError):
            pass
    return []


def _tensors(drafter: Eagle3VLMDrafter, layer0_prefix: str) -> dict[str, torch.Tensor]:
    """Weights under serving names: our names are already speculators'; SGLang calls ``layers.0`` ``midlayer``."""
    out = {}
    for name, t in drafter.state_dict().items():
        if name.startswith("layers.0."):
            name = layer0_prefix + name[len("layers.0.") :]
        out[name] = t.detach().to("cpu").contiguous()
    if drafter.d2t is not None:
        out["d2t"], out["t2d"] = out["d2t"].to(torch.int64), out["t2d"].to(torch.bool)
    return out


def speculators_config(drafter: Eagle3VLMDrafter, speculative_tokens: int, verifier: str | None) -> dict:
    cfg = drafter.config
    verifier_path = verifier or cfg.target_name_or_path
    if not verifier_path:
        # speculators and vLLM load the verifier's config (and embeddings) from this path; null makes them try the Hub
        raise ExportError(
            "the speculators format names the verifier (target) checkpoint, and this drafter records none: pass "
            "--verifier <target dir or hub id>"
        )
    return {
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "architectures": ["Eagle3Speculator"],
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": int(speculative_tokens),
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_path, "architectures": _target_architectures(cfg)},
        },
        "transformer_layer_config": _llama_fields(cfg, cfg.num_hidden_layers),
        "draft_vocab_size": int(cfg.head_size),
        "target_hidden_size": None,  # the draft is as wide as the target
        "eagle_aux_hidden_state_layer_ids": list(cfg.hidden_layers),  # always written: the null default collides
        "norm_before_residual": bool(cfg.norm_before_residual),  # always written: vLLM and speculators differ
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "tie_word_embeddings": False,
        "specvlm_lit": _provenance(cfg),
    }


def sglang_config(drafter: Eagle3VLMDrafter) -> dict:
    cfg = drafter.config
    if cfg.num_hidden_layers != 1:
        raise ExportError(
            f"the sglang format holds a single draft layer (midlayer); this drafter has {cfg.num_hidden_layers}"
        )
    if cfg.norm_before_residual:
        raise ExportError("the sglang format's layer uses norm_before_residual=false; this drafter was built with true")
    fields = _llama_fields(cfg, 1)
    fields.update(
        architectures=["LlamaForCausalLMEagle3"],
        draft_vocab_size=int(cfg.head_size),
        target_hidden_size=None,
        eagle_config={"eagle_aux_hidden_state_layer_ids": list(cfg.hidden_layers), "use_aux_hidden_state": True},
        specvlm_lit=_provenance(cfg),
    )
    return fields


def _provenance(cfg) -> dict:
    """What the serving formats have no field for, kept so an import restores it (readers ignore unknown keys)."""
    return {
        "model_type": cfg.model_type,
        "image_rows": cfg.image_rows,
        "target_fingerprint": cfg.target_fingerprint,
        "target_name_or_path": cfg.target_name_or_path,
    }


def export_drafter(
    source: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str,
    *,
    speculative_tokens: int = 3,
    verifier: str | None = None,
) -> Path:
    """Write the drafter directory ``source`` to ``out`` in ``fmt`` (``speculators`` | ``sglang`` | ``eagle``).

    Raises :class:`ExportError` for what the format cannot hold; ``out`` is then untouched."""
    source = Path(source).expanduser()
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    drafter = load_drafter(source)
    if fmt == "eagle":
        kind = drafter.config.model_type
        raise ExportError(
            f"the eagle (EAGLE-1, vLLM method: eagle) format holds fc [H, 2H] without bias, one layer without "
            f"input_layernorm, no final norm and the target's LM head; {source} is a {kind} drafter with "
            + (
                "per-half input norms, an fc bias and a final norm (RMS normalisation cannot be folded into fc)"
                if not isinstance(drafter, Eagle3VLMDrafter)
                else "three fused target layers and its own head"
            )
            + ". Export an EAGLE-3 drafter with --format speculators (vLLM method: eagle3) or --format sglang"
        )
    drafter = _refuse_unless_servable(drafter, fmt, source)
    if fmt == "speculators":
        if not isinstance(speculative_tokens, int) or speculative_tokens < 1:
            raise ExportError(f"--speculative-tokens must be an integer >= 1, got {speculative_tokens!r}")
        config, tensors = speculators_config(drafter, speculative_tokens, verifier), _tensors(drafter, "layers.0.")
    else:
        config, tensors = sglang_config(drafter), _tensors(drafter, "midlayer.")
    out = Path(out).expanduser().absolute()
    with atomic_directory(out, _KIND) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------------------------------------ import
def _layout(config: dict, config_file: Path) -> str:
    if config.get("speculators_model_type") == "eagle3":
        return "speculators"
    if "LlamaForCausalLMEagle3" in (config.get("architectures") or []):
        return "sglang"
    raise ImportCheckpointError(
        f"{config_file} is neither a speculators eagle3 checkpoint (speculators_model_type: eagle3) nor an "
        f"SGLang/SpecForge one (architectures: [LlamaForCausalLMEagle3])"
    )


def import_checkpoint(
    source: str | os.PathLike,
    target: TargetAdapter,
    out: str | os.PathLike,
    *,
    image_rows: str | None = None,
) -> Path:
    """Turn a public EAGLE-3 checkpoint (speculators or SGLang/SpecForge layout: ``config.json`` +
    ``model.safetensors``) for ``target`` into this project's drafter directory ``out`` (atomic), so it can be
    benchmarked (``decode.py drafter=<out>``) and fine-tuned here.

    ``image_rows``: what the checkpoint's training fed at image rows (default: the value an export of this project
    recorded, else ``placeholder``, how speculators and SpecForge train VLM drafters)."""
    source = Path(source).expanduser()
    config_file = source / "config.json"
    config = _read_json(config_file)
    layout = _layout(config, config_file)
    layer = config["transformer_layer_config"] if layout == "speculators" else config
    aux = config.get("eagle_aux_hidden_state_layer_ids") if layout == "speculators" else None
    if layout == "sglang":
        aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    aux = list(aux) if aux else default_hidden_layers(target.num_layers)
    extra = config.get("specvlm_lit") or {}

    def size(field: str, ours: int, name: str) -> None:
        theirs = layer.get(field)
        if theirs is not None and int(theirs) != int(ours):
            raise ImportCheckpointError(
                f"{config_file}: {field} is {theirs} but the target's {name} is {ours}: this checkpoint was trained "
                f"for another target"
            )

    size("hidden_size", target.hidden_size, "hidden size")
    size("vocab_size", target.vocab_size, "vocabulary size")
    th = config.get("target_hidden_size")
    if th is not None and int(th) != target.hidden_size:
        raise ImportCheckpointError(
            f"{config_file}: target_hidden_size is {th} but the target's hidden size is {target.hidden_size}"
        )
    weights_file = source / "model.safetensors"
    if not weights_file.is_file():
        raise ImportCheckpointError(f"{weights_file} is missing (sharded checkpoints are not supported)")
    with safe_open(str(weights_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prefix = "layers.0." if layout == "speculators" else "midlayer."
    state = {}
    for name, t in tensors.items():
        if name == "embed_tokens.weight":
            if tuple(t.shape) != (target.vocab_size, target.hidden_size):
                raise ImportCheckpointError(
                    f"{weights_file}: embed_tokens.weight is {list(t.shape)} but the target's embedding is "
                    f"[{target.vocab_size}, {target.hidden_size}]"
                )
            continue  # the drafter shares the target's embedding
        if name.startswith(prefix):
            name = "layers.0." + name[len(prefix) :]
        state[name] = t
    head = state.get("lm_head.weight")
    if head is None:
        raise ImportCheckpointError(f"{weights_file} has no lm_head.weight: not an EAGLE-3 draft head")
    draft_vocab = int(head.shape[0])
    rope = layer.get("rope_parameters") or {
        "rope_type": (layer.get("rope_scaling") or {}).get("rope_type", "default"),
        "rope_theta": float(layer.get("rope_theta", 10000.0)),
    }
    try:
        drafter = Eagle3VLMDrafter.for_target(
            target,
            hidden_layers=aux,
            intermediate_size=int(layer["intermediate_size"]),
            num_attention_heads=int(layer["num_attention_heads"]),
            num_key_value_heads=int(layer.get("num_key_value_heads") or layer["num_attention_heads"]),
            head_dim=int(layer.get("head_dim") or layer["hidden_size"] // layer["num_attention_heads"]),
            rms_norm_eps=float(layer.get("rms_norm_eps", 1e-6)),
            rope_parameters=rope,
            num_hidden_layers=int(layer.get("num_hidden_layers", 1)),
            draft_vocab_size=draft_vocab if draft_vocab < target.vocab_size else None,
            # speculators and SpecForge both default to false when the key is missing (vLLM to true: exports write it)
            norm_before_residual=bool(config.get("norm_before_residual", False)),
            image_rows=image_rows or extra.get("image_rows") or "placeholder",
            target_name_or_path=getattr(target.config, "_name_or_path", None) or None,
        )
    except (KeyError, ValueError) as e:
        raise ImportCheckpointError(f"{config_file}: {e}") from None
    expected = set(drafter.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ImportCheckpointError(
            f"{weights_file} does not hold an EAGLE-3 head of this layout: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    for name, t in state.items():
        want = drafter.state_dict()[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ImportCheckpointError(
                f"{weights_file}: {name} is {list(t.shape)} but {list(want.shape)} is expected from config.json"
            )
    drafter.load_state_dict({k: v.to(drafter.state_dict()[k].dtype) for k, v in state.items()})
    return save_atomically(drafter.eval(), out)


def _read_json(config_file: Path) -> dict:
    if not config_file.is_file():
        raise ImportCheckpointError(f"{config_file} is missing: pass the checkpoint directory")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ImportCheckpointError(f"{config_file} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImportCheckpointError(f"{config_file} does not hold a JSON object")
    return data
