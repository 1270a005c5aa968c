#!/usr/bin/env python
"""TRL's DPO loss, metrics and LoRA gradients on pairs pmss_dist tokenized, in the peft venv.

    python tests/trl_dpo_check.py --base BASE_DIR --adapter PEFT_DIR --batch BATCH.safetensors \\
        --loss sigmoid|ipo --beta B --out OUT.safetensors

Imports neither torchtune nor pmss_dist (peft refuses torchtune's torchao): tests/train/test_dpo.py
writes the files and runs it with PMSS_PEFT_PYTHON. BATCH holds ``tokens`` and ``labels`` as our
collation makes them (n chosen rows, then n rejected rows; ``labels[t]`` the target of position
``t`` or -100). They become TRL's collated inputs (``input_ids``, ``attention_mask``,
``completion_mask``), and `DPOTrainer._compute_loss` runs on the base with a fresh PEFT LoRA that
TRL makes from the adapter's config (``peft_config``), its tensors then set to the adapter's, and no
``ref_model``: TRL's reference is then the base with the adapter disabled. (Given a PeftModel, TRL
would take the adapter as loaded as the reference.) OUT
gets ``loss``, ``metric.<name>`` for every metric TRL logged, and ``grad.<peft name>`` for every
trainable tensor.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer


def trl_inputs(tokens: torch.Tensor, labels: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Our rows as TRL's collator makes them: token t is a completion token when ours trains on
    predicting it, i.e. ``labels[t-1]`` is not -100."""
    completion = torch.zeros_like(tokens)
    completion[:, 1:] = (labels[:, :-1] != -100).long()
    trained = labels != -100
    # Real tokens end with the last trained target (the EOS); the rest is our right padding.
    last = torch.where(trained.any(-1), trained.long().cumsum(-1).argmax(-1) + 1, torch.ones_like(tokens[:, 0]))
    attention = (torch.arange(tokens.shape[1]) <= last[:, None]).long()
    return {"input_ids": tokens, "attention_mask": attention, "completion_mask": completion}


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--base", "--adapter", "--batch", "--loss", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--beta", type=float, required=True)
    args = parser.parse_args()
    batch = load_file(args.batch)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    settings = json.loads((Path(args.adapter) / "adapter_config.json").read_text())
    lora = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["target_modules"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")),
                                        pad_token=f"t{model.config.pad_token_id}", eos_token=f"t{model.config.eos_token_id}")
    pairs = Dataset.from_dict({"prompt": ["t1"], "chosen": ["t2"], "rejected": ["t3"]})  # TRL wants a dataset
    with tempfile.TemporaryDirectory() as tmp:
        config = DPOConfig(output_dir=tmp, beta=args.beta, loss_type=[args.loss], report_to=[], use_cpu=True,
                           per_device_train_batch_size=1, bf16=False, fp16=False)
        trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                             peft_config=lora)
        weights = load_file(str(Path(args.adapter) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(trainer.model, weights)
        if result.unexpected_keys:
            raise AssertionError(f"the adapter's tensors {result.unexpected_keys[:4]} are not in TRL's model")
        trainer.model.train()
        inputs = trl_inputs(batch["tokens"], batch["labels"], model.config.pad_token_id)
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
        loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    out |= {f"metric.{k}": torch.tensor([float(v[-1])]) for k, v in trainer._metrics["train"].items()}
    out |= {f"grad.{name.replace('.default', '')}": p.grad.contiguous() for name, p in trainer.model.named_parameters()
            if p.requires_grad}
    save_file(out, args.out)


if __name__ == "__main__":
    main()
