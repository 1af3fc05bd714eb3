"""Lossless speculative decoding of vision-language models with an exported SpecVLM / EagleVLM drafter.

    python decode.py image=cat.png prompt="What is in the image?"      # newest drafter exported by train.py
    python decode.py drafter=outputs/train/runs/<run>/drafter image=cat.png prompt="..." temperature=1 seed=3
    python decode.py mode=bench                                      # side-by-side benchmark (bench.json/md/png)
    python decode.py mode=bench bench.samples_per_resolution=4 bench.assistant=/models/small-llava

Generate mode prints the answer, then per-request statistics (sigma, rounds, prefill / draft / verify time, visual
tokens seen by the target and by the drafter). Bench mode prints a summary and, as its LAST line, the output
directory holding bench.json, bench.md and bench.png. Bad input (missing / unreadable image, empty prompt,
max_new_tokens < 1, negative temperature, top_p outside (0, 1], a drafter trained for another target) stops with a
one-line ``error: ...`` and a non-zero exit status, before any model work. The Python API is
:class:`specvlm_lit.decoding.pipeline.SpecVLMPipeline`; see docs/decoding.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

import specvlm_lit.utils.hydra_resolvers  # noqa: F401  (registers ${safe_dirname:...} for sweep dirs)
from specvlm_lit.errors import find_user_error, one_line

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def _scalar_text(v):
    """Hydra parses ``prompt=123`` / ``prompt=true`` as numbers / bools; a prompt or a path is text."""
    return str(v) if isinstance(v, (bool, int, float)) else v


def check_threads(threads):
    from specvlm_lit.decoding.pipeline import check_int_option

    return check_int_option(threads, "threads", 1, allow_none=True, hint=" or null (torch default)")


def set_threads(threads) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(int(threads))


def run_generate(cfg: dict, root: Path) -> None:
    from specvlm_lit.decoding.pipeline import (
        DecodeInputError,
        check_target_dir,
        check_tree,
        find_exported_drafters,
        format_stats,
        validate_request,
    )

    # 1. Everything the user typed, before any heavy import or model work.
    req = validate_request(
        _scalar_text(cfg.get("image")),
        _scalar_text(cfg.get("prompt")),
        max_new_tokens=cfg.get("max_new_tokens"),
        temperature=cfg.get("temperature"),
        top_p=cfg.get("top_p"),
        top_k=cfg.get("top_k"),
        seed=cfg.get("seed"),
    )
    tree = check_tree(cfg.get("tree"))
    target = check_target_dir(cfg.get("target"))
    drafter = cfg.get("drafter")
    candidates = []
    if drafter is None:
        outputs = root / "outputs"
        candidates = find_exported_drafters(outputs)
        if not candidates:
            raise DecodeInputError(
                f"no drafter given and none exported under {outputs}: run `python train.py` "
                f"(it exports <run dir>/drafter) or pass drafter=<drafter directory>"
            )
    else:
        drafter = str(drafter)
        if not Path(drafter).expanduser().is_dir():
            raise DecodeInputError(
                f"drafter directory {drafter} does not exist; pass the directory train.py exported (<run dir>/drafter)"
            )

    threads = check_threads(cfg.get("threads"))

    # 2. Load (target, processor, drafter) and decode.
    from specvlm_lit.decoding.pipeline import SpecVLMPipeline, pick_drafter

    set_threads(threads)

    common = dict(dtype=cfg.get("dtype", "float32"), device=str(cfg.get("device", "cpu")), tree=tree)
    if drafter is None:
        pipe = SpecVLMPipeline(target, None, **common)
        fingerprint = pipe.adapter.fingerprint()
        found = pick_drafter(candidates, fingerprint)
        if found is None:
            newest, ncfg = candidates[0]
            raise DecodeInputError(
                f"found {len(candidates)} exported drafter(s) under {root / 'outputs'} but none was trained for this "
                f"target (fingerprint {fingerprint}; the newest, {newest}, is for {ncfg.get('target_fingerprint')}): "
                f"run `python train.py target.path={target}` or pass drafter=<drafter directory>"
            )
        from specvlm_lit.drafter.base import load_drafter

        d = load_drafter(found, target=pipe.adapter, dtype=pipe.adapter.dtype, device=common["device"])
        pipe = SpecVLMPipeline.from_components(pipe.adapter, pipe.processor, d, tree=tree)
        drafter = str(found)
    else:
        pipe = SpecVLMPipeline(target, drafter, **common)
    result = pipe.generate(
        req.image,
        req.prompt,
        max_new_tokens=req.max_new_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
    )
    print(result.text)
    print()
    print(format_stats(result, pipe.tree))
    print(f"target: {target}\ndrafter: {drafter} ({pipe.method})")


def run_bench(cfg: dict, root: Path, out_dir: str) -> Path:
    from specvlm_lit.decoding.bench import LABELS, run_benchmark, settings_from_config

    settings = settings_from_config(cfg, out_dir, root)
    set_threads(check_threads(cfg.get("threads")))
    out = run_benchmark(settings)
    import json

    report = json.loads((out / "bench.json").read_text())
    # tau: median over prompts of paired per-prompt ratios vs HF generate(), with its interval; vs own: the same
    # against this project's own AR loop (the gain from speculation alone).
    print(
        f"{'method':<24} {'T':>4} {'tau':>6} {'95% interval':>14} {'vs own':>7} {'sigma':>6} {'tok/s':>8} "
        f"{'identical':>9}"
    )

    def row(label: str, t: str, r: dict) -> None:
        ident = "-" if r.get("identical") is None else f"{100 * r['identical']:.0f}%"
        fmt = lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}"  # noqa: E731
        ci = r.get("tau_ci")
        interval = "-" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
        print(
            f"{label:<24} {float(t):>4g} {fmt(r.get('tau')):>6} {interval:>14} {fmt(r.get('tau_own')):>7} "
            f"{fmt(r.get('sigma')):>6} {fmt(r.get('tokens_per_s'), 1):>8} {ident:>9}"
        )

    for m, per_t in report["results"].items():
        for t, r in per_t.items():
            if "skipped" in r:
                print(f"{LABELS[m]:<24} {float(t):>4g}  skipped: {r['skipped']}")
                continue
            row(LABELS[m], t, r)
            if report["config"].get("prompts") is not None:  # bench.prompts: one line per category too
                for category, rc in r.get("per_task", {}).items():
                    row(f"  {category}"[:24], t, rc)
    m = report["machine"]
    print(f"machine: {m['cpu'] or m['machine']}, {m['torch_threads']} torch threads, {m['device']} {m['dtype']}")
    return out


@hydra.main(version_base="1.3", config_path="conf/decode", config_name="decode")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = HydraConfig.get().runtime.output_dir
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
        root = Path(data.get("paths", {}).get("root_dir") or ROOT)
        mode = data.get("mode")
        if mode == "generate":
            run_generate(data, root)
        elif mode == "bench":
            out = run_bench(data, root, out_dir)
            print(Path(out).resolve())
        else:
            raise SystemExit(f"error: mode must be 'generate' or 'bench', got {mode!r}")
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None:
            raise
        raise SystemExit(f"error: {one_line(user_error)}") from None  # the user's to fix: one line, no traceback


if __name__ == "__main__":
    main()
