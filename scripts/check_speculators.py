"""Check a speculators-format export with the real ``speculators`` package, in its own virtual environment.

    python scripts/check_speculators.py <drafter dir> <export dir> [--target <target dir>] [--env /work/speculators-env]

The project's transformers pin conflicts with speculators' (see docs/serving.md), so this runs in two processes:

1. here (project venv): random token ids and random aux hidden states (the three fused target layers), the target's
   token embedding, and this project's drafter's logits for 3 training-time-test steps, computed from scratch the way
   decoding sees them (row t at step j = the true rows 0..t, then its own chain of j predictions);
2. in ``<env>`` (speculators installed): ``Eagle3DraftModel.from_pretrained(<export dir>)`` with eager attention,
   the target embedding copied in (exports leave ``embed_tokens`` to the verifier), its own TTT ``forward`` with
   3 steps on the same inputs, the logits of every step captured at ``lm_head``.

Prints ``MATCH`` and exits 0 when every step's logits agree (max abs difference <= 1e-4) on the rows where both
definitions exist (a row whose chain runs past the sequence end is padded differently by the two), else exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 3
TOL = 1e-4

# Runs inside the speculators environment: argv = [inputs.pt, export dir, outputs.pt].
_SPECULATORS_SIDE = r"""
import sys, torch
from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
inputs, export, outputs = sys.argv[1:4]
data = torch.load(inputs)
cfg = Eagle3SpeculatorConfig.from_pretrained(export)
cfg.transformer_layer_config._attn_implementation = "eager"   # flex attention fails on CPU for short sequences
model = Eagle3DraftModel.from_pretrained(export, config=cfg).eval()
with torch.no_grad():
    model.embed_tokens.weight.copy_(data["embed"])
captured = []
model.lm_head.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
ids = data["ids"]
with torch.no_grad():
    model(
        hidden_states=data["aux"], input_ids=ids, document_ids=torch.zeros_like(ids),
        position_ids=torch.arange(ids.shape[1])[None], ttt_steps=data["steps"],
    )
from importlib.metadata import version
torch.save({"logits": [c[0] for c in captured], "version": version("speculators")}, outputs)
"""


def project_side(drafter_dir: Path, target_dir: str | None, seq_len: int = 12):
    import torch

    from specvlm_lit.drafter.base import load_drafter

    drafter = load_drafter(drafter_dir).eval()
    cfg = drafter.config
    target_dir = target_dir or cfg.target_name_or_path
    if not target_dir:
        raise SystemExit("error: the drafter records no target; pass --target <target dir>")
    from specvlm_lit.target import TargetAdapter

    target = TargetAdapter.from_pretrained(target_dir)
    drafter.check_target(target)
    g = torch.Generator().manual_seed(0)
    H, n_aux = cfg.hidden_size, len(cfg.hidden_layers)
    ids = torch.randint(0, target.vocab_size, (1, seq_len), generator=g)
    aux = torch.randn(1, seq_len, n_aux * H, generator=g)
    with torch.no_grad():
        embeds = target.embed_tokens(ids)[0]
        feats = drafter.fc(aux)[0]
        logits = torch.zeros(STEPS, seq_len, cfg.head_size)
        for t in range(seq_len):
            chain = []
            for j in range(STEPS):
                if t + j >= seq_len:
                    break
                rows_e = embeds[: t + 1 + j]
                rows_f = torch.cat([feats[: t + 1], *([torch.stack(chain)] if chain else [])])
                h = drafter(rows_e[None], rows_f[None]).hidden[0, -1]
                logits[j, t] = drafter.head_logits(h)
                chain.append(h)
    return {"ids": ids, "aux": aux, "embed": target.embed_tokens.weight.detach().clone(), "steps": STEPS}, logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafter_dir")
    p.add_argument("export_dir")
    p.add_argument("--target", help="target checkpoint directory (default: the drafter's recorded target)")
    p.add_argument("--env", default=os.environ.get("SPECULATORS_ENV", "/work/speculators-env"))
    args = p.parse_args(argv)
    env_python = Path(args.env) / "bin" / "python"
    if not env_python.is_file():
        print(f"error: no speculators environment at {args.env} (docs/serving.md says how to create it)")
        return 2
    cfg = json.loads((Path(args.export_dir) / "config.json").read_text())
    if cfg.get("speculators_model_type") != "eagle3":
        print(f"error: {args.export_dir} is not a speculators eagle3 export")
        return 2
    import torch

    inputs, ours = project_side(Path(args.drafter_dir), args.target)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(inputs, Path(tmp) / "in.pt")
        script = Path(tmp) / "side.py"
        script.write_text(_SPECULATORS_SIDE)
        r = subprocess.run(
            [str(env_python), str(script), str(Path(tmp) / "in.pt"), str(args.export_dir), str(Path(tmp) / "out.pt")],
            capture_output=True,
            text=True,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        )
        if r.returncode != 0:
            print("error: speculators could not load or run the export:\n" + r.stderr[-3000:])
            return 1
        theirs = torch.load(Path(tmp) / "out.pt")
    T = inputs["ids"].shape[1]
    worst = 0.0
    for j in range(STEPS):
        rows = T - j  # rows t with t + j < T
        diff = (ours[j, :rows] - theirs["logits"][j][:rows].float()).abs().max().item()
        worst = max(worst, diff)
        print(f"ttt step {j}: {rows} rows, max |logit difference| = {diff:.2e}")
    verdict = "MATCH" if worst <= TOL else "MISMATCH"
    print(f"{verdict}: speculators {theirs['version']} vs specvlm-lit, worst {worst:.2e} (tolerance {TOL:g})")
    return 0 if verdict == "MATCH" else 1


if __name__ == "__main__":
    sys.exit(main())
