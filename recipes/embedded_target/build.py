"""Build the embedded target: ``python -m recipes.embedded_target.build [hydra overrides]``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf

from specvlm_lit.data.datamodule import ShardDataModule
from specvlm_lit.synthetic.generate import CorpusSpec, ensure_corpus
from specvlm_lit.synthetic.scenes import COLOURS, SHAPES
from specvlm_lit.utils.atomic import atomic_directory

from . import CONF_DIR
from .evaluate import evaluate
from .recipe import TargetPretraining, attribute_word_groups, build_target_config, check_same_shape
from .tokenizer import build_processor, train_tokenizer
from .vision_pretrain import check_tower_shape, load_tower, run_stage1


def corpus_texts(corpus_dir: Path):
    for shard in sorted(corpus_dir.glob("train-*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            for m in json.loads(s["json"])["conversations"]:
                yield m["value"]


def save_target(model, processor, out_dir: Path, report: dict) -> None:
    """Save weights (bf16 on disk, loaded as fp32) + processor atomically: all or nothing."""
    # The committed targets predate the publisher's marker; their build report says this recipe wrote them.
    with atomic_directory(out_dir, "target", published_before=lambda d: (d / "build_report.json").is_file()) as tmp:
        # bf16 on disk keeps the committed weights small; config dtype float32 makes
        # from_pretrained() upcast on load (bf16 matmuls are slow and inexact on CPUs).
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        model.to(torch.float32)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for c in (cfg, cfg["text_config"], cfg["vision_config"]):
            c["dtype"] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        processor.save_pretrained(tmp)
        (tmp / "build_report.json").write_text(json.dumps(report, indent=2))


def _built_target_dir(path, option: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{option}: no built target at {path} (config.json or model.safetensors missing); "
            "build it first with python -m recipes.embedded_target.build"
        )
    return path


def tower_from_target(path, vision_config) -> dict:
    """The vision tower weights of a built target, checked to fit ``vision_config``."""
    from transformers import LlavaForConditionalGeneration

    path = _built_target_dir(path, "vision_pretrain.from_target")
    source = LlavaForConditionalGeneration.from_pretrained(path)
    check_tower_shape(source.config.vision_config, vision_config, "vision_pretrain.from_target", path)
    return source.model.vision_tower.state_dict()


def init_weights(path, config) -> tuple[dict, dict]:
    """Every weight of a built target (to continue stage 2 from it), checked to fit ``config``."""
    from transformers import LlavaForConditionalGeneration

    path = _built_target_dir(path, "init_from")
    source = LlavaForConditionalGeneration.from_pretrained(path)
    check_tower_shape(source.config.vision_config, config.vision_config, "init_from", path)
    check_same_shape(
        source.config.text_config,
        config.text_config,
        (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ),
        f"init_from: the language model at {path}",
        "model.text",
    )
    earlier = json.loads((path / "build_report.json").read_text()) if (path / "build_report.json").is_file() else {}
    steps = earlier.get("steps_total", earlier.get("steps", 0))
    return source.state_dict(), {"path": str(path), "steps_total": steps}


def check_tower_sources(cfg: DictConfig) -> None:
    """Reject recipes that name two sources for the tower: only one can be used, and guessing which loses work."""
    named = [
        k
        for k in ("vision_pretrain.from_target", "vision_pretrain.from_tower", "init_from")
        if OmegaConf.select(cfg, k)
    ]
    if len(named) > 1:
        raise ValueError(f"{' and '.join(named)} are both set: each gives the tower its weights; keep one")


def run_build(cfg: DictConfig) -> dict:
    """Corpus -> tokenizer -> trained target -> saved + evaluated. Returns the build report."""
    L.seed_everything(cfg.seed, workers=True)
    t0 = time.perf_counter()
    # Every key of the corpus group but its directory is a CorpusSpec field: new generator options
    # reach the build without another hand-written argument here.
    fields = {k: v for k, v in OmegaConf.to_container(cfg.corpus, resolve=True).items() if k != "dir"}
    spec = CorpusSpec(**{**fields, "resolutions": tuple(fields["resolutions"])})
    corpus = ensure_corpus(cfg.corpus.dir, spec)
    check_tower_sources(cfg)
    from transformers import AutoTokenizer

    init_from = cfg.get("init_from")
    if init_from:  # continuing a built target: its tokenizer, exactly
        tokenizer = AutoTokenizer.from_pretrained(_built_target_dir(init_from, "init_from"))
    elif cfg.tokenizer.get("from_dir"):  # share another build's tokenizer exactly (assistant VLMs must)
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer.from_dir)
    else:
        tokenizer = train_tokenizer(corpus_texts(corpus), vocab_size=cfg.tokenizer.vocab_size)
    patch = cfg.model.vision.patch_size
    processor = build_processor(tokenizer, patch_size=patch)
    config = build_target_config(
        tokenizer,
        OmegaConf.to_container(cfg.model.vision),
        OmegaConf.to_container(cfg.model.text),
        cfg.model.vision_feature_layer,
    )
    vision_state, init_state, report = None, None, {}
    stage1 = cfg.vision_pretrain
    if init_from:  # stage 2 continues from a built target; its tower already went through stage 1
        init_state, report["init_from"] = init_weights(init_from, config)
    elif stage1.get("from_target"):  # reuse another build's grounded tower (the assistant VLM shares the target's)
        vision_state = tower_from_target(stage1.from_target, config.vision_config)
        report["vision_pretrain"] = {"from_target": str(stage1.from_target)}
    elif stage1.get("from_tower"):  # a tower saved by stage 1 (python -m recipes.embedded_target.vision_pretrain)
        vision_state, stage1_report = load_tower(stage1.from_tower, config.vision_config)
        report["vision_pretrain"] = {"from_tower": str(stage1.from_tower), **stage1_report}
    elif stage1.steps > 0:  # stage 1: ground the tower on dense patch labels
        vision_state, report["vision_pretrain"] = run_stage1(cfg, processor.image_processor)
        print(f"vision pre-training: {json.dumps(report['vision_pretrain'])}")
    # Re-seed: stage 2 starts from the same random state whether stage 1 ran in this process or not.
    L.seed_everything(cfg.seed, workers=True)
    swap_p = cfg.augment.attribute_swap_p
    groups = attribute_word_groups(tokenizer, {"colour": list(COLOURS), "shape": SHAPES}) if swap_p > 0 else None
    module = TargetPretraining(
        config,
        **cfg.optim,
        vision_state=vision_state,
        freeze_vision=cfg.freeze_vision,
        init_state=init_state,
        attribute_swap_p=swap_p,
        attribute_groups=groups,
    )
    n_params = sum(p.numel() for p in module.model.parameters())
    print(f"embedded target: {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    shards = sorted(str(p) for p in corpus.glob("train-*.tar"))
    datamodule = ShardDataModule(
        shards,
        sorted(str(p) for p in corpus.glob("val-*.tar")),
        processor,
        batch_size=cfg.data.batch_size,
        max_length=cfg.data.max_length,
        shuffle_buffer=cfg.data.shuffle_buffer,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
    )
    trainer = hydra.utils.instantiate(cfg.trainer)
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - t0
    model = module.model.eval()
    earlier = report.get("init_from", {}).get("steps_total", 0)
    report = {
        **report,
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "steps": trainer.global_step,
        "steps_total": earlier + trainer.global_step,
        "recipe": OmegaConf.to_container(cfg, resolve=True),
    }
    out_dir = Path(cfg.out_dir)
    save_target(model, processor, out_dir, report)
    # Evaluate what was saved (bf16-rounded weights), exactly as users will load it.
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(out_dir)
    results = evaluate(
        saved,
        AutoProcessor.from_pretrained(out_dir),
        sorted(str(p) for p in corpus.glob("test-*.tar")),
        limit=cfg.evaluate.limit,
        max_new_tokens=cfg.evaluate.max_new_tokens,
        log=print,
    )
    report["heldout_eval"] = results
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "examples"}, indent=2))
    return report


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="target_recipe")
def main(cfg: DictConfig) -> None:
    run_build(cfg)
    print(Path(cfg.out_dir).resolve())


if __name__ == "__main__":
    main()
