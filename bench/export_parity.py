"""Largest logit differences of prune, merge and the PEFT export against the trained adapter, over the
whole quickstart test split. Run after the README flow (needs peft):

    python bench/export_parity.py runs/quickstart
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from sora_cli.data import eval_order
from sora_cli.models import load_adapted, load_base
from sora_cli.recipe import DataConfig
from sora_cli.tasks.classification import collate, encode, load_splits

run = Path(sys.argv[1])
full, tok, meta = load_adapted(run / "final")
pruned, _, _ = load_adapted(run / "final-pruned")
merged = AutoModelForSequenceClassification.from_pretrained(run / "merged").eval()
base, _ = load_base(run / "final", meta)
peft = PeftModel.from_pretrained(base, str(run / "peft")).eval()
s = load_splits(DataConfig(dataset="packaged:rotten_tomatoes"))
enc = encode(s.test, tok, 64, "classification")
worst = {"prune": 0.0, "merge": 0.0, "peft": 0.0}
agree = {k: 0 for k in worst}
with torch.no_grad():
    for idx in eval_order(enc.lengths, 128):
        b = collate(enc, idx, tok.pad_token_id); b.pop("labels")
        ref = full(**b).logits
        for name, m in (("prune", pruned), ("merge", merged), ("peft", peft)):
            out = m(**b).logits
            worst[name] = max(worst[name], float((out - ref).abs().max()))
            agree[name] += int((out.argmax(-1) == ref.argmax(-1)).sum())
print({k: f"{v:.2e}" for k, v in worst.items()}, "same predictions:", agree, "of", len(enc))
