from pathlib import Path

import pytest

from specvlm_lit.synthetic import CorpusSpec, generate_corpus

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_TARGET = REPO / "data" / "embedded_target"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small corpus with the default generator settings (seconds to build)."""
    return generate_corpus(
        tmp_path_factory.mktemp("corpus") / "synthetic",
        CorpusSpec(n_train=120, n_val=16, n_test=32, samples_per_shard=50),
        log=lambda *_: None,
    )


@pytest.fixture(scope="session")
def corpus_tokenizer(small_corpus):
    import json

    import webdataset as wds

    from recipes.embedded_target.tokenizer import train_tokenizer

    texts = [
        m["value"]
        for shard in sorted(small_corpus.glob("train-*.tar"))
        for s in wds.WebDataset(str(shard), shardshuffle=False)
        for m in json.loads(s["json"])["conversations"]
    ]
    return train_tokenizer(texts, vocab_size=512)


TINY_TARGET_OVERRIDES = [
    "model.vision.hidden_size=32",
    "model.vision.intermediate_size=64",
    "model.vision.num_hidden_layers=1",
    "model.vision.num_attention_heads=2",
    "model.text.hidden_size=32",
    "model.text.intermediate_size=64",
    "model.text.num_hidden_layers=2",
    "model.text.num_attention_heads=2",
    "model.text.num_key_value_heads=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.shuffle_buffer=8",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.logger=false",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "evaluate.limit=2",
    "evaluate.max_new_tokens=8",
    "vision_pretrain.steps=2",
    "vision_pretrain.batch_size=4",
    "vision_pretrain.val_every=2",
    "vision_pretrain.val_batches=1",
]


def build_tiny_target(corpus: Path, out: Path) -> dict:
    """The real target recipe at toy size (seconds): a loadable LLaVA dir with processor."""
    from hydra import compose, initialize_config_dir

    from recipes.embedded_target.build import CONF_DIR, run_build

    overrides = [
        f"out_dir={out}",
        f"log_dir={out.parent / 'logs'}",
        f"corpus.dir={corpus}",
        "corpus.n_train=120",
        "corpus.n_val=16",
        "corpus.n_test=32",
        "corpus.samples_per_shard=50",
    ] + TINY_TARGET_OVERRIDES
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="target_recipe", overrides=overrides)
    return run_build(cfg)


@pytest.fixture(scope="session")
def tiny_target(small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_target") / "target"
    build_tiny_target(small_corpus, out)
    return out
