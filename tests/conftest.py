import functools
import os
from pathlib import Path

import pytest

from specvlm_lit.synthetic import CorpusSpec, generate_corpus

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_TARGET = REPO / "data" / "embedded_target"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small corpus with the default generator settings (seconds to build)."""
    return generate_corpus(tmp_path_factory.mktemp("corpus") / "synthetic",
                           CorpusSpec(n_train=120, n_val=16, n_test=32, samples_per_shard=50), log=lambda *_: None)


@pytest.fixture(scope="session")
def corpus_tokenizer(small_corpus):
    import json

    import webdataset as wds

    from specvlm_lit.embedded.tokenizer import train_tokenizer

    texts = [m["value"] for shard in sorted(small_corpus.glob("train-*.tar"))
             for s in wds.WebDataset(str(shard), shardshuffle=False) for m in json.loads(s["json"])["conversations"]]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="session")
def embedded_processor():
    if not (EMBEDDED_TARGET / "config.json").is_file():
        pytest.skip("embedded target not built: python -m specvlm_lit.embedded.build")
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(EMBEDDED_TARGET)
