"""Train a MUSCLE compatibility adapter with CompatTrainer, on one GPU or several.

One GPU:       python examples/train_compat.py --new-base ... --data train.jsonl
Several GPUs:  torchrun --standalone --nproc-per-node 8 examples/train_compat.py ...
               accelerate launch --multi_gpu --num_processes 8 examples/train_compat.py ...

The script is the same in every case: under torchrun/accelerate each process trains on its share
of every batch and the loss is the mean over the tokens of the whole global batch (see
muscle_fast/train/DISTRIBUTED.md). ``--smoke DIR`` builds tiny random models and data in DIR and
trains on them, to try a launcher without downloading anything (it runs on CPU too).

Data: a JSON-lines file with a "text" field per line; every token of the text is a target, padding
is ignored. The new base's tokenizer encodes it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a MUSCLE compatibility adapter (new base + new task adapter, distilled "
                    "toward the old task model where the mask says so). Works unchanged under "
                    "torchrun and accelerate launch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--new-base", help="new base model: hub name or path")
    p.add_argument("--new-adapter", help="new task adapter (peft directory); the compatibility "
                                         "adapter starts as a copy of it")
    p.add_argument("--old-base", help="old base model: hub name or path")
    p.add_argument("--old-adapter", help="old task adapter (peft directory); omit when --old-base "
                                         "is the whole old task model")
    p.add_argument("--data", help="JSON lines with a 'text' field")
    p.add_argument("--smoke", metavar="DIR", help="build tiny random models and data in DIR and "
                                                  "train on them (no download, CPU is fine)")
    p.add_argument("--output-dir", default="compat_out", help="where the adapter is saved")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=8, help="examples per device per step")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--mask", default="muscle", choices=["muscle", "old_correct",
                   "token_likelihood", "sequence_likelihood", "all_old"])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs)")
    args = p.parse_args(argv)
    if args.smoke is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("new_base", "new_adapter", "old_base",
                                                         "data") if getattr(args, k) is None]
        if missing:
            p.error(f"{', '.join(missing)} required (or --smoke DIR)")
    return args


def make_smoke_setup(d: Path, vocab: int = 64, n_rows: int = 16, length: int = 12):
    """Tiny random Llama bases with LoRA task adapters, and rows of random token ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False))

    paths = {}
    for name, seed in (("old", 1), ("new", 2)):
        base, adapter = d / f"{name}_base", d / f"{name}_adapter"
        if not (adapter / "adapter_config.json").exists():  # every rank may get here at once
            llama(seed).save_pretrained(base)
            torch.manual_seed(seed + 10)
            get_peft_model(llama(seed), LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                init_lora_weights=False)).save_pretrained(str(adapter))
        paths[name] = (str(base), str(adapter))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n_rows, length), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()}
            for r in ids]
    return paths, rows


def load_rows(path: str, tokenizer, max_length: int):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                enc = tokenizer(json.loads(line)["text"], truncation=True, max_length=max_length,
                                padding="max_length", return_tensors="pt")
                ids, attn = enc["input_ids"][0], enc["attention_mask"][0]
                rows.append({"input_ids": ids, "attention_mask": attn,
                             "labels": torch.where(attn.bool(), ids, torch.full_like(ids, -100))})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import TrainingArguments

    from muscle_fast.train import CompatArguments, CompatTrainer, build_compat_model

    if args.smoke:
        d = Path(args.smoke)
        d.mkdir(parents=True, exist_ok=True)
        # the first local process writes the tiny models; the others wait for it
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            paths, rows = make_smoke_setup(d)
            (d / "ready").touch()
        else:
            import time

            while not (d / "ready").exists():
                time.sleep(0.2)
            paths, rows = make_smoke_setup(d)
        model = build_compat_model(paths["new"][0], paths["new"][1], paths["old"][0],
                                   paths["old"][1])
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.new_base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        old_tokenizer = AutoTokenizer.from_pretrained(args.old_base)
        rows = load_rows(args.data, tokenizer, args.max_length)
        dtype = torch.bfloat16 if args.bf16 else None
        model = build_compat_model(args.new_base, args.new_adapter, args.old_base,
                                   args.old_adapter, old_tokenizer=old_tokenizer,
                                   new_tokenizer=tokenizer, dtype=dtype)
    training = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=args.lr, bf16=args.bf16, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0)
    trainer = CompatTrainer(
        model=model, args=training, train_dataset=rows,
        compat_args=CompatArguments(mask=args.mask, temperature=args.temperature,
                                    ce_weight=args.ce_weight))
    trainer.train()
    trainer.save_model()  # only the compatibility adapter: a plain peft adapter directory
    if trainer.is_world_process_zero():
        print(f"compatibility adapter saved to {args.output_dir} "
              f"({trainer.accelerator.num_processes} process(es))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
