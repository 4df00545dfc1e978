"""Largest logit differences of prune, merge and the PEFT export against the trained adapter, over the
whole quickstart test split. Run after the README flow (needs peft):

    python bench/export_parity.py runs/quickstart

A mean-pooled run (model.pooling: mean) has no PEFT export; its merge is a sentence-transformers folder, compared
through `SentenceTransformer(...).encode` on the raw texts (needs sentence-transformers):

    python bench/export_parity.py runs/quickstart-mean
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from sora_cli.data import eval_order
from sora_cli.models import load_adapted, load_base
from sora_cli.recipe import DataConfig
from sora_cli.tasks.classification import collate, encode, load_splits

MAX_LENGTH = 64  # the quickstart's data.max_length


def merged_model(run: Path) -> Any:
    """The merged model as its users load it: transformers, or sentence-transformers for a mean-pooled run."""
    if (run / "merged" / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(run / "merged"), device="cpu")
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()


def main(run: Path) -> None:
    full, tok, meta = load_adapted(run / "final")
    contestants: dict[str, Any] = {"prune": load_adapted(run / "final-pruned")[0], "merge": merged_model(run)}
    if (run / "peft").is_dir():
        from peft import PeftModel

        contestants["peft"] = PeftModel.from_pretrained(load_base(run / "final", meta)[0], str(run / "peft")).eval()
    s = load_splits(DataConfig(dataset="packaged:rotten_tomatoes"))
    enc = encode(s.test, tok, MAX_LENGTH, "classification")
    worst = {k: 0.0 for k in contestants}
    agree = {k: 0 for k in contestants}
    with torch.no_grad():
        for idx in eval_order(enc.lengths, 128):
            b = collate(enc, idx, tok.pad_token_id)
            b.pop("labels")
            ref = full(**b).logits
            for name, m in contestants.items():
                if hasattr(m, "encode"):  # sentence-transformers: tokenizes the texts itself
                    out = m.encode([s.test.texts[i][0] for i in idx], convert_to_tensor=True)
                else:
                    out = m(**b).logits
                worst[name] = max(worst[name], float((out - ref).abs().max()))
                agree[name] += int((out.argmax(-1) == ref.argmax(-1)).sum())
    print({k: f"{v:.2e}" for k, v in worst.items()}, "same predictions:", agree, "of", len(enc))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
