"""PEFT exports as servers that read only the global ``r``/``lora_alpha`` apply them (vLLM's LoRA
loader, llama.cpp's adapter converter): one rank for every module, no patterns, and the same
weights as the merged export for every family row (Phi's fused modules included); and the
``--max-lora-rank`` the export tells the user vLLM needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_export import hf_tensors, save_run_adapter, trained_adapter
from test_load import FAMILIES, make_hf_checkpoint, our_model

from pmss_dist.hf.export import export_merged, export_peft, vllm_max_lora_rank, vllm_serving_note

K = 4


def vllm_merged(base_dir: Path, peft_dir: Path) -> dict[str, torch.Tensor]:
    """The base weights with the PEFT adapter applied as vLLM documents it: of adapter_config.json
    only ``r``, ``lora_alpha`` and ``target_modules`` are read (``rank_pattern``/``alpha_pattern``
    are ignored); every module has rank ``r`` (the one rank checked against --max-lora-rank, which
    sizes the LoRA slots), and a module whose name's last component is in ``target_modules`` gets
    ``W += (lora_alpha / r) · lora_B @ lora_A``."""
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    r, targets = config["r"], set(config["target_modules"])
    lora = load_file(str(peft_dir / "adapter_model.safetensors"))
    weights = hf_tensors(base_dir)
    for key, lora_a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        lora_b = lora[key.replace(".lora_A.", ".lora_B.")]
        assert module.rpartition(".")[2] in targets, f"{module} is not in target_modules {sorted(targets)}"
        assert lora_a.shape[0] == lora_b.shape[1] == r, f"{module} has rank {lora_a.shape[0]}, the config's r is {r}"
        weight = weights[f"{module}.weight"]
        weights[f"{module}.weight"] = (weight.float() + config["lora_alpha"] / r * (lora_b @ lora_a)).to(weight.dtype)
    return weights


@pytest.mark.parametrize("kind", ["pmss", "lora"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_semantics_give_the_merged_weights(tmp_path, capsys, family, kind):
    """A random nonzero adapter (scale alpha / k = 2) exported both ways: the vLLM-semantics load
    of the PEFT export equals the merged export on every targeted tensor (fp32 rounding) and the
    base on every other one."""
    base, adapter, merged_dir, peft_dir = (tmp_path / name for name in ("base", "adapter", "merged", "peft"))
    make_hf_checkpoint(base, family)
    model = trained_adapter(our_model(base), kind, size=K, alpha=8.0, seed=5, steps=0)  # random, untrained
    save_run_adapter(model, adapter, base, kind, K, 8.0)
    export_merged(adapter, base, merged_dir, progress=False)
    export_peft(adapter, base, peft_dir)
    r = 3 * K if FAMILIES[family][0] == "Phi3Config" else K  # Phi's fused qkv_proj stacks q, k, v
    assert (f"export_peft: vLLM serves this adapter (rank {r}) with --max-lora-rank {({K: 8, 3 * K: 16})[r]}"
            in capsys.readouterr().err)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (r, r, {}, {})

    base_weights, merged, served = hf_tensors(base), hf_tensors(merged_dir), vllm_merged(base, peft_dir)
    assert set(served) == set(merged) == set(base_weights)
    adapted = {key.removeprefix("base_model.model.").replace(".lora_A.", ".")
               for key in load_file(str(peft_dir / "adapter_model.safetensors")) if ".lora_A." in key}
    for key, value in served.items():
        if key in adapted:
            assert not torch.equal(merged[key], base_weights[key]), f"{key}: the adapter changed nothing"
            torch.testing.assert_close(value, merged[key], rtol=1e-5, atol=1e-6, msg=key)
        else:  # a tensor the PEFT export leaves out must be one the merged export did not change
            assert torch.equal(value, base_weights[key]) and torch.equal(merged[key], base_weights[key]), key


@pytest.mark.parametrize("r,expected", [(1, 1), (2, 8), (8, 8), (9, 16), (12, 16), (256, 256), (257, 320),
                                        (320, 320), (321, 512), (512, 512), (513, None)])
def test_vllm_max_lora_rank(r, expected):
    assert vllm_max_lora_rank(r) == expected


def test_rank_past_vllm_points_to_the_merged_export():
    assert vllm_serving_note(12) == "export_peft: vLLM serves this adapter (rank 12) with --max-lora-rank 16"
    assert vllm_serving_note(513) == ("export_peft: vLLM cannot serve this adapter as a LoRA (rank 513 > 512); "
                                      "serve the merged export (pmss-export without --peft) instead")
