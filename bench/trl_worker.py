"""One torchrun worker of the TRL baseline: ``transformers`` LlamaForCausalLM loaded from the
benchmark's HF checkpoint, ``trl.DPOTrainer`` with a ``peft`` LoRA on all seven projections and no
``ref_model`` (TRL's reference is then the base with the adapter disabled), on CPU with accelerate's
gloo process group when N > 1 — the usual TRL + peft DPO set-up.

It runs in the peft venv, so it imports nothing from pmss_dist: bench_dpo.py hands it the pairs as
our trainer tokenised them (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), which TRL's own
collator pads and masks; TRL's tokenisation of text is skipped.

    torchrun --nproc_per_node 2 bench/trl_worker.py --model DIR --pairs pairs.json \
        --rank 8 --steps 10 --batch 2 --out DIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import transformers  # noqa: F401  (imported before record_worker: "after import" is comparable)
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from benchlib import HF_PROJECTIONS, peer_worker_arguments, record_worker

class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer on pairs that are already token ids in its collator's format."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


def main() -> None:
    write_record = record_worker(os.environ["BENCH_RECORD_DIR"])
    parser = peer_worker_arguments("--pairs", "JSON list of {prompt_ids, chosen_ids, rejected_ids}",
                                   "global batch in pairs")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="TRL's default (DPOConfig turns it on); off by default here, like our runs")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # The pairs are token ids already: TRL needs a tokenizer only for its pad and EOS ids.
    c = model.config
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(c.vocab_size)},
                                                                             unk_token="t0")),
                                        pad_token=f"t{c.pad_token_id}", eos_token=f"t{c.eos_token_id}")
    pairs = Dataset.from_list(json.loads(open(args.pairs).read()))
    config = DPOConfig(output_dir=args.out, beta=args.beta, loss_type=["sigmoid"], learning_rate=args.lr,
                       lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.0, max_grad_norm=1.0,
                       per_device_train_batch_size=args.batch // world, gradient_accumulation_steps=1,
                       max_steps=args.steps, max_length=None, gradient_checkpointing=args.gradient_checkpointing,
                       use_cpu=True, bf16=False, fp16=False,
                       report_to=[], save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
                       disable_tqdm=True)
    lora = LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=HF_PROJECTIONS, bias="none",
                      task_type="CAUSAL_LM")
    trainer = PretokenizedDPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer,
                                     peft_config=lora)
    trainer.train()
    # accelerate leaves its gloo group alive to interpreter exit, where its worker thread, releasing
    # a finished collective, can abort the process or deadlock against destroy_process_group (both
    # seen here): with every rank done, write the record and leave without finalising.
    if dist.is_initialized():
        dist.barrier()
    write_record()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
