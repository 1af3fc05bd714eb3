"""Answer a few held-out images with the embedded target (greedy, and one sampled answer at T=1).

``python -m recipes.embedded_target.demo`` builds the synthetic corpus on first use (~40 s), loads the
committed target through :class:`~specvlm_lit.target.TargetAdapter` and prints questions, answers,
references and whether each answer states the right facts. The last line is the target directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from transformers import AutoProcessor

from specvlm_lit.synthetic.generate import CorpusSpec, ensure_corpus
from specvlm_lit.synthetic.samples import iter_test_samples
from specvlm_lit.target import TargetAdapter

from . import CONF_DIR
from .evaluate import answer, answer_is_correct


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="demo")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    target_dir = Path(cfg.target_dir)
    corpus = ensure_corpus(cfg.corpus_dir, CorpusSpec())
    adapter = TargetAdapter.from_pretrained(target_dir)
    processor = AutoProcessor.from_pretrained(target_dir)
    adapter.check_tokenizer(processor.tokenizer)
    n_params = sum(p.numel() for p in adapter.model.parameters())
    print(f"embedded target {target_dir}: {n_params / 1e6:.1f}M parameters, fingerprint {adapter.fingerprint()}")
    correct = 0
    t0 = time.perf_counter()
    for i, (image, rec) in enumerate(
        iter_test_samples(sorted(str(p) for p in corpus.glob("test-*.tar")), cfg.num_samples)
    ):
        q = rec["conversations"][0]["value"].replace("<image>\n", "")
        greedy = answer(adapter, processor, image, q, cfg.max_new_tokens)
        ok = answer_is_correct(greedy, rec["checks"][0], rec["tasks"][0], rec["scene"])
        correct += ok
        print(
            f"\n[{rec['id']}] {image.size[0]}px, {rec['tasks'][0]}\n  Q: {q}\n  A (greedy): {greedy}\n"
            f"  reference:  {rec['conversations'][1]['value']}\n  states the right facts: {ok}"
        )
        if i == 0:
            sampled = answer(adapter, processor, image, q, cfg.max_new_tokens, temperature=cfg.sample_temperature)
            print(f"  A (T={cfg.sample_temperature}): {sampled}")
    print(f"\n{correct}/{cfg.num_samples} greedy answers correct here ({time.perf_counter() - t0:.1f}s)")
    report = target_dir / "build_report.json"
    if report.is_file():
        ev = json.loads(report.read_text()).get("heldout_eval", {})
        if ev:
            print(f"held-out accuracy at build time: {ev['accuracy']:.1%} on {ev['samples']} test samples")
    print(target_dir.resolve())


if __name__ == "__main__":
    main()
