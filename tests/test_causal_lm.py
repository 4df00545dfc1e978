"""Causal LMs on a tiny Llama and its word-level ChatML tokenizer (tests/tiny_causal.py): response-only loss against
a hand-computed cross-entropy, selective logits against the full logits, loss normalisation across micro-batches,
a golden run with exact resume, evaluation metrics by hand, PEFT / merge round trips, and every bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sora_cli.adapters import LoRA, get_method
from sora_cli.adapters.inject import inject
from sora_cli.cli import app
from sora_cli.engine import train, train_step
from sora_cli.recipe import AdapterConfig, DataConfig, TrainConfig, load_recipe
from sora_cli.tasks.causal_lm import CausalLMTask, normalize_answer
from sora_cli.tasks.classification import ClassificationTask

from .conftest import INSTRUCTION, events, killed_at_step_4_and_resumed, sentiment_records, write_jsonl
from .tiny_causal import save_tiny_causal_model, tiny_causal_tokenizer

runner = CliRunner()
def tiny_model(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64), AutoTokenizer.from_pretrained(directory)


def encoded_batch(task: CausalLMTask, tokenizer: Any, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    task.records = {"train": records}
    task.places = {"train": [f"record {i}" for i in range(len(records))]}
    data = task.encode(tokenizer, 64).train
    return task.collate(data, list(range(len(data))), tokenizer.pad_token_id)


def hand_ce(model: Any, ids: list[int], positions: list[int]) -> float:
    """Mean cross-entropy of tokens ids[t] for t in positions, each predicted from position t - 1 (full logits)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)  # (T, V)
    return -sum(float(logp[t - 1, ids[t]]) for t in positions) / len(positions)


# ---------------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion", "chat", "text"])
def test_response_only_loss_is_the_cross_entropy_of_the_response_tokens(tiny_llama_dir: Path, fmt: str) -> None:
    model, tok = tiny_model(tiny_llama_dir)
    eos = tok.eos_token_id
    record, response, template = {
        "alpaca": ({"instruction": INSTRUCTION, "input": "the film was great", "output": "positive"},
                   tok("positive", add_special_tokens=False)["input_ids"] + [eos], False),
        "prompt_completion": ({"prompt": "what of this review ?", "completion": "good"},
                              tok("good", add_special_tokens=False)["input_ids"] + [eos], False),
        # the assistant's content and the template's end-of-turn markup: "negative<|im_end|>\n"
        "chat": ({"messages": [{"role": "user", "content": "the plot was bad"},
                               {"role": "assistant", "content": "negative"}]},
                 tok("negative<|im_end|>\n", add_special_tokens=False)["input_ids"], True),
        "text": ({"text": "the movie was very good"}, None, False),
    }[fmt]
    task = CausalLMTask(DataConfig(train_file="x.jsonl", task_type="causal_lm", format=fmt, chat_template=template))
    batch = encoded_batch(task, tok, [record])
    ids = batch["input_ids"][0].tolist()
    if response is None:  # text: every token after the first, EOS included
        positions = list(range(1, len(ids)))
    else:
        assert ids[-len(response):] == response
        positions = list(range(len(ids) - len(response), len(ids)))
    assert task.count(batch) == len(positions)
    with torch.no_grad():
        ours = float(task.loss_sum(model, batch)) / task.count(batch)
    assert ours == pytest.approx(hand_ce(model, ids, positions), abs=1e-12)  # float64 throughout


def test_selective_logits_equal_the_full_logits_in_loss_and_gradients(tiny_llama_dir: Path) -> None:
    model, tok = tiny_model(tiny_llama_dir)
    torch.manual_seed(0)
    inject(model, LoRA(AdapterConfig(method="lora", r=4, alpha=8.0), TrainConfig()), ())
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)  # a trained-like adapter: B ≠ 0, so A gets gradients too
    task = CausalLMTask(DataConfig(train_file="x.jsonl", task_type="causal_lm", format="alpaca", chat_template=True))
    batch = encoded_batch(task, tok, sentiment_records(5, seed=4))  # rows of different lengths: right padding
    params = [p for p in model.parameters() if p.requires_grad]
    mine = task.loss_sum(model, batch) / task.count(batch)
    grads = torch.autograd.grad(mine, params)
    # The full computation: logits at every position (transformers' own loss upcasts to float32, so not that one).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V) float64
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                  ignore_index=-100)
    reference_grads = torch.autograd.grad(reference, params)
    assert float(mine.detach()) == pytest.approx(float(reference.detach()), abs=1e-12)
    for a, b in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _stepped(model: Any, task: Any, batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The LoRA tensors after one engine step with plain SGD (lr 1: the update is the gradient itself)."""
    method = LoRA(AdapterConfig(method="lora", r=4, alpha=8.0), TrainConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    train_step(model, task, method, torch.optim.SGD(params, lr=1.0), batches, params, None,
               torch.autocast("cpu", enabled=False), 0)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_micro_batches_of_unequal_label_counts_give_the_big_batch_step(tiny_llama_dir: Path) -> None:
    records = sentiment_records(4, seed=9)
    records[3]["output"] = "positive and not negative very"  # a longer response: more label tokens in its batch
    task = CausalLMTask(DataConfig(train_file="x.jsonl", task_type="causal_lm", format="alpaca", chat_template=True))
    results = []
    for split in ([0, 1, 2, 3], [0, 1, 2], [3]):
        model, tok = tiny_model(tiny_llama_dir)
        torch.manual_seed(0)
        inject(model, LoRA(AdapterConfig(method="lora", r=4, alpha=8.0), TrainConfig()), ())
        if len(split) == 4:
            batches = [encoded_batch(task, tok, records)]
        else:  # the same four examples as micro-batches of 3 and 1 (an odd last micro-batch)
            batches = [encoded_batch(task, tok, [records[i] for i in split]), encoded_batch(task, tok, [records[3]])]
        counts = [task.count(b) for b in batches]
        results.append(_stepped(model, task, batches))
        if len(split) != 4:
            assert counts[0] / 3 != counts[1]  # unequal label tokens per example: a per-micro-batch mean is biased
            break
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-12, rtol=0)


def test_classification_micro_batches_of_unequal_size_give_the_big_batch_step(tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .conftest import make_sentences

    rows = make_sentences(5, seed=2)
    task = ClassificationTask(DataConfig(train_file="x.csv"), "classification", 2)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in rows])

    def part(idx: list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": enc.input_ids[idx], "attention_mask": enc.attention_mask[idx], "labels": labels[idx]}

    results = []
    for batches in ([part([0, 1, 2, 3, 4])], [part([0, 1, 2, 3]), part([4])]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2, dtype=torch.float64)
        model.eval()  # no dropout: the two runs must see the same function
        torch.manual_seed(1)
        inject(model, get_method(AdapterConfig(method="lora", r=4, alpha=8.0), TrainConfig()))
        results.append(_stepped(model, task, batches))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training runs

# Train losses at steps 4, 8, 12 of the tiny causal recipe, in float64 (see test_engine.GOLDEN_LOSSES for why).
CAUSAL_GOLDEN = [4.075102427490528, 3.8105662764630805, 3.770483451514028]


def test_causal_golden_run_and_exact_resume(causal_recipe) -> None:
    full = load_recipe(causal_recipe("full", model={"dtype": "float64"}))
    result = train(full)
    run = Path(full.train.output_dir)
    losses = [e["loss"] for e in events(run, "train")]
    assert losses == pytest.approx(CAUSAL_GOLDEN, abs=1e-8, rel=0), losses
    meta = json.loads((run / "final" / "adapter.json").read_text())
    assert meta["task"] == {"type": "causal_lm", "format": "alpaca", "chat_template": True, "train_on_prompt": False}
    assert meta["modules_to_save"] == []
    assert "lm_head" not in meta["modules"] and len(meta["modules"]) == 14  # 7 projections x 2 layers
    metrics = {"loss", "perplexity", "token_accuracy", "exact_match", "choice_accuracy"}
    assert metrics <= set(result.test) <= metrics | {"constant_predictor"}  # the 2-layer model may answer all alike
    resumed = killed_at_step_4_and_resumed(load_recipe(causal_recipe("part", model={"dtype": "float64"})))
    a, b = load_file(run / "final" / "adapter.safetensors"), load_file(resumed / "final" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_normalize_answer() -> None:
    assert normalize_answer("  The Positive!  ") == "positive"
    assert normalize_answer("An  apple, a DAY.") == "apple day"
    assert normalize_answer("negative") != normalize_answer("not negative")


def test_evaluation_metrics_equal_one_prompt_at_a_time(causal_recipe) -> None:
    """Batched, left-padded generation and the B×C choice forward give what each prompt alone gives."""
    from sora_cli.models import load_adapted
    from sora_cli.tasks import EvalContext

    recipe = load_recipe(causal_recipe("eval", train={"max_steps": 40, "eval_every": None, "save_every": None},
                                       data={"max_new_tokens": 4}))
    train(recipe)
    model, tok, _ = load_adapted(Path(recipe.train.output_dir) / "final")
    task = CausalLMTask(recipe.data)
    task.load_data()
    test = task.encode(tok, recipe.data.max_length).test
    metrics = task.evaluate(model, test, EvalContext(8, torch.device("cpu"), torch.autocast("cpu", enabled=False), tok))
    exact = chosen = 0
    loss = tokens = 0.0
    answers, picks = set(), set()
    with torch.no_grad():
        for e in test.examples:
            out = model.generate(torch.tensor([e.prompt_ids]), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            answer = tok.decode(out[0, len(e.prompt_ids):], skip_special_tokens=True)
            exact += normalize_answer(answer) == normalize_answer(e.reference)
            answers.add(normalize_answer(answer))
            scores = []
            for choice in ("positive", "negative"):
                ids = e.prompt_ids + tok(choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                scores.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(e.prompt_ids), len(ids))))
            chosen += ("positive", "negative")[scores.index(max(scores))] == e.reference
            picks.add(scores.index(max(scores)))
            positions = [t for t in range(1, len(e.labels)) if e.labels[t] != -100]
            loss += hand_ce(model, e.input_ids, positions) * len(positions)
            tokens += len(positions)
    assert metrics["exact_match"] == exact / len(test) and metrics["choice_accuracy"] == chosen / len(test)
    assert metrics["loss"] == pytest.approx(loss / tokens, rel=1e-5)  # float32 model: batched vs single sums
    assert 0 < exact < len(test) and 0 < chosen < len(test)  # neither trivially all nor nothing
    assert metrics.get("constant_predictor") == (1.0 if len(answers) == 1 or len(picks) == 1 else None)
    with torch.no_grad():  # zero final norm: every logit 0, so greedy picks token 0 at every step, for every prompt
        model.model.norm.weight.zero_()
    ctx = EvalContext(8, torch.device("cpu"), torch.autocast("cpu", enabled=False), tok)
    assert task.evaluate(model, test, ctx)["constant_predictor"] == 1.0


# ---------------------------------------------------------------------------------------------
# Exports


def test_peft_export_and_merge_of_a_causal_adapter(causal_recipe, tmp_path: Path) -> None:
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sora_cli.models import load_adapted, load_base

    recipe = load_recipe(causal_recipe("export", train={"max_steps": 20, "eval_every": None, "save_every": None},
                                       adapter={"sparse_lambda": 3.0}))
    train(recipe)
    final = Path(recipe.train.output_dir) / "final"
    result = runner.invoke(app, ["prune", str(final), "-o", str(tmp_path / "pruned"), "--peft", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] == []
    adapted, tok, meta = load_adapted(final)
    base, _ = load_base(final, meta)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    batch = tok(["the film was great", "the plot was very bad and the movie awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours_logits = adapted.to(torch.float64)(**batch).logits
        # the export folds s·B·diag(g) into lora_B in float32 (relative 2^-24 per weight): same function otherwise
        torch.testing.assert_close(theirs.to(torch.float64)(**batch).logits, ours_logits, atol=1e-5, rtol=0)

    assert runner.invoke(app, ["merge", str(final), "-o", str(tmp_path / "merged")]).exit_code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # no adapter code at all
    merged_tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged_tok.chat_template == tok.chat_template and merged_tok.eos_token == tok.eos_token
    adapted, _, _ = load_adapted(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "classify the sentiment of this review\nit was good"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert torch.equal(merged.generate(**prompt, **kwargs), adapted.generate(**prompt, **kwargs))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the field, file or record; exit 2; nothing written


def _fails(recipe: Path, *overrides: str) -> str:
    out = Path(load_recipe(recipe).train.output_dir or "")
    result = runner.invoke(app, ["train", str(recipe), *overrides])
    assert result.exit_code == 2, result.output
    assert not out.exists(), "a failed start must write nothing"
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return " ".join(result.output.split())


def test_bad_causal_inputs(causal_recipe, tmp_path: Path) -> None:
    def data(name: str, rows: list[dict[str, Any]] | str) -> str:
        path = tmp_path / name
        path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    good = sentiment_records(20, seed=5)
    recipe = causal_recipe("bad")
    assert "data.format: expected one of auto, alpaca, prompt_completion, chat, text, got 'xml'" in _fails(
        recipe, "data.format=xml")
    message = _fails(recipe, f"data.train_file={data('cols.jsonl', [{'question': 'a', 'answer': 'b'}] * 20)}")
    assert "no known format in the columns found (question, answer)" in message and "alpaca needs" in message
    missing = [dict(r) for r in good]
    del missing[7]["output"]
    # line 8 of the file, whichever split the seeded shuffle put it in
    assert "missing.jsonl, line 8: missing field 'output' (absent or null); an alpaca record needs" in _fails(
        recipe, f"data.train_file={data('missing.jsonl', missing)}", "data.split=[0.9,0.1]")
    empty = [dict(r) for r in good]
    empty[3]["output"] = "  "
    assert "empty response" in _fails(recipe, f"data.train_file={data('empty.jsonl', empty)}")
    assert "data.max_length: every train example's response is longer than 2 tokens" in _fails(
        recipe, "data.max_length=2")
    assert "broken.jsonl, line 1, column 2: not valid JSON" in _fails(
        recipe, f"data.train_file={data('broken.jsonl', '{not json')}")
    nochat = save_tiny_causal_model(tmp_path / "nochat", tiny_causal_tokenizer(chat_template=False))
    chat = [{"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
            for r in good]
    assert "chat template" in _fails(recipe, f"model.name_or_path={nochat}",
                                     f"data.train_file={data('chat.jsonl', chat)}")
    odd = [dict(r) for r in good]
    for r in odd:
        r["output"] = "good"  # no reference is one of the choices: choice accuracy cannot be scored
    assert "is not one of data.choices ['positive', 'negative']" in _fails(
        recipe, f"data.train_file={data('odd.jsonl', odd)}")


def test_a_response_that_does_not_fit_is_dropped_with_one_line(causal_recipe, tmp_path: Path) -> None:
    rows = sentiment_records(40, seed=6)
    rows[0]["output"] = " ".join(["positive"] * 80)  # longer than max_length 64 on its own
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    recipe = causal_recipe("long", data={"train_file": str(path), "choices": None, "split": [0.9, 0.1]},
                           train={"max_steps": 1, "eval_every": None, "save_every": None})
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "dropped 1 of 36 train examples whose response alone is longer than data.max_length=64" in result.output


def test_gradient_checkpointing_and_tensorboard(causal_recipe) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.models.llama.modeling_llama import LlamaAttention

    calls = [0]  # attention forwards, counted by a global hook (a recomputed block runs its attention again)

    def count(module: torch.nn.Module, args: Any, output: Any) -> None:
        calls[0] += isinstance(module, LlamaAttention)

    common = {"max_steps": 4, "eval_every": None, "save_every": None, "log_every": 2}
    plain = load_recipe(causal_recipe("plain", model={"dtype": "float64"}, train=common))
    ckpt = load_recipe(causal_recipe("ckpt", model={"dtype": "float64"},
                                     train={**common, "gradient_checkpointing": True, "report_to": ["tensorboard"]}))
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        train(plain)
        plain_calls, calls[0] = calls[0], 0
        train(ckpt)
    finally:
        handle.remove()
    assert calls[0] - plain_calls == 2 * 4  # each of the 2 blocks ran again in each of the 4 backward passes
    a = load_file(Path(plain.train.output_dir) / "final" / "adapter.safetensors")
    b = load_file(Path(ckpt.train.output_dir) / "final" / "adapter.safetensors")
    for key in a:  # recomputed activations: the same gradients (float64, no dropout in the tiny Llama)
        torch.testing.assert_close(b[key], a[key], atol=1e-12, rtol=0)
    board = EventAccumulator(str(Path(ckpt.train.output_dir) / "tensorboard"))
    board.Reload()
    logged = {e["step"]: e["loss"] for e in events(Path(ckpt.train.output_dir), "train")}
    assert {s.step: s.value for s in board.Scalars("train/loss")} == pytest.approx(logged, rel=1e-6)
    assert "test_final/exact_match" in board.Tags()["scalars"] and "test_base/exact_match" in board.Tags()["scalars"]


def test_packaged_smollm2_trains_a_step_and_merges_to_safetensors(tmp_path: Path) -> None:
    """The real GGUF model of the causal quickstart (so that path cannot rot): it loads by directory + gguf_file (the
    packaged name resolves to the same two), trains one step, and merges into a plain safetensors model."""
    from transformers import AutoModelForCausalLM

    from sora_cli.models import _resolve

    folder, gguf = _resolve("packaged:SmolLM2-135M-Instruct")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and (Path(folder) / gguf).is_file()
    recipe = Path(__file__).parent.parent / "recipes" / "quickstart-causal.yaml"
    run = tmp_path / "smol"
    result = runner.invoke(app, ["train", str(recipe), f"model.name_or_path={folder}", f"model.gguf_file={gguf}",
                                 "train.max_steps=1", "data.max_train_samples=8", "data.max_eval_samples=2",
                                 "data.max_new_tokens=2", "-o", str(run)])
    assert result.exit_code == 0, result.output
    assert "de-quantizing" not in result.output  # the GGUF loader's own progress bar is kept quiet
    meta = json.loads((run / "final" / "adapter.json").read_text())
    assert meta["base_model_loading"]["gguf_file"] == gguf and meta["task"]["type"] == "causal_lm"
    assert len(meta["modules"]) == 30 * 7  # 30 blocks x 7 projections
    assert {"exact_match", "choice_accuracy", "loss"} <= set(meta["metrics"]["base_test"])
    result = runner.invoke(app, ["merge", str(run / "final"), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain safetensors, no gguf_file
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    assert weights[f"{name}.weight"].dtype == torch.float32 and merged.config.model_type == "llama"
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_evaluation_inputs_that_cannot_be_scored_fail_before_anything_is_written(causal_recipe, tmp_path: Path) -> None:
    rows = [{"prompt": "" if i % 5 == 0 else "what of this review ?", "completion": "positive" if i % 2 else "negative"}
            for i in range(40)]
    path = write_jsonl(tmp_path / "empty-prompts.jsonl", rows)  # this tokenizer adds no BOS: "" has no tokens
    recipe = causal_recipe("noprompt", data={"train_file": str(path), "chat_template": False})
    assert "the prompt is empty (or cut away by data.max_length)" in _fails(recipe)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the movie was very good"}] * 20)
    recipe = causal_recipe("text", data={"train_file": str(text), "choices": None, "chat_template": False},
                           train={"metric_for_best": "exact_match"})
    assert "train.metric_for_best: exact_match is not computed with this data section" in _fails(recipe)


def test_train_on_prompt_is_evaluated_on_the_response_only(causal_recipe) -> None:
    common = {"max_steps": 1, "warmup_steps": 1, "eval_every": None, "save_every": None}  # lr 0: nothing moves
    plain = train(load_recipe(causal_recipe("resp", train=common)))
    on_prompt = train(load_recipe(causal_recipe("all", train=common, data={"train_on_prompt": True})))
    assert on_prompt.test == plain.test  # the same untrained adapter scored on the same response tokens


def test_generation_stops_at_the_models_own_end_tokens() -> None:
    from types import SimpleNamespace

    from sora_cli.tasks.causal_lm import stop_ids

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 107]))  # Gemma: <eos>, <end_of_turn>
    assert stop_ids(model, SimpleNamespace(eos_token_id=1)) == [1, 107]
    assert stop_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)),
                    SimpleNamespace(eos_token_id=2)) == [2]
