"""The fidelity report in words: what the samples are, the lines `export` prints, and why a common adapter server
(vLLM-style) would refuse or mis-serve the adapter (fidelity.json `serving_warnings`)."""

from __future__ import annotations

from lora_sft.export.options import ONTO

# Ranks vLLM's --max-lora-rank accepts (its default is 16).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Linear layers of decoder blocks that vLLM's LoRA layers cover across the common architectures.
VLLM_TARGETS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "query_key_value",
    "dense",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "fc1",
    "fc2",
    "out_proj",
    "w1",
    "w2",
    "w3",
    "wqkv",
    "wo",
    "Wqkv",
    "in_proj",
}


def serving_warnings(config: dict) -> list[str]:
    """Why common adapter servers (vLLM-style) would refuse or mis-serve this adapter; empty if none."""
    warnings = []
    if config.get("modules_to_save"):
        warnings.append(
            f"modules_to_save ({', '.join(dict.fromkeys(config['modules_to_save']))}): vLLM loads only lora_A/lora_B weights and refuses adapters that carry fully trained modules; serve the merged export instead"
        )
    if config.get("use_dora"):
        warnings.append(
            "DoRA: vLLM and TGI/LoRAX implement plain LoRA only (no magnitude vector); serve the merged export instead"
        )
    rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
    if rank > VLLM_RANKS[-1]:
        warnings.append(
            f"rank {rank}: vLLM's --max-lora-rank stops at {VLLM_RANKS[-1]}; lower lora.rank or serve the merged export"
        )
    elif rank > 16:
        need = next(r for r in VLLM_RANKS if r >= rank)
        warnings.append(
            f"rank {rank}: above vLLM's default --max-lora-rank 16; start it with --max-lora-rank {need} (more memory per adapter slot)"
        )
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    odd = sorted(t for t in targets if t.rsplit(".", 1)[-1] not in VLLM_TARGETS)
    if odd:
        warnings.append(
            f"target modules {', '.join(odd)}: outside the decoder linear layers vLLM's LoRA covers ({', '.join(sorted(VLLM_TARGETS)[:9])}, ...); it would refuse or ignore them"
        )
    if config.get("trainable_token_indices"):
        warnings.append(
            "added special tokens (trainable_token_indices): vLLM's LoRA loads only lora_A/lora_B, not the trained token rows, and the base's vocabulary lacks the tokens; serve the merged export (its vocabulary and tokenizer hold them)"
        )
    if config.get("bias", "none") != "none":
        warnings.append(
            f"bias={config['bias']}: vLLM serves bias terms only with --enable-lora-bias, other servers not at all"
        )
    return warnings


def samples_words(samples: int, train_samples: int) -> str:
    """What the fidelity samples are: held out, train rows (no eval split), or both (a small eval split)."""
    if not train_samples:
        return f"{samples} held-out samples"
    if train_samples == samples:
        return f"{samples} train rows (the run has no eval split: not held out)"
    return (
        f"{samples} samples ({samples - train_samples} held-out, {train_samples} train rows: the eval split is small)"
    )


def format_report(report: dict) -> str:
    lines = [
        f"fidelity on {samples_words(report['samples'], report.get('train_samples', 0))} ({report['positions']} positions), tolerance {report['tolerance']:.3g} ({report.get('tolerance_rule', '')}):"
    ]
    for key, desc in report["models"].items():
        lines.append(f"  ({key}) {desc}: perplexity {report['perplexity'][key]:.4f}")
    notes = {"a_vs_b": "  <- quantization gap", "a_vs_c": "  <- the merged export vs the model as trained"}
    for pair, m in report["pairs"].items():
        note = notes.get(pair, "")
        lines.append(
            f"  {pair}: max |logit diff| {m['max_abs_logit_diff']:.3g}, mean KL {m['mean_kl']:.3g}, perplexity change {m['perplexity_change']:+.4g}, greedy agreement {m['greedy_agreement']:.4f}{note}"
        )
    adapter = report["loaded_plain"]["adapter"]["vs_b"]
    lines.append(f"  adapter loaded with plain peft vs (b): max |logit diff| {adapter['max_abs_logit_diff']:.3g}")
    if "adapter_4bit" in report["loaded_plain"]:
        m = report["loaded_plain"]["adapter_4bit"]["vs_a"]
        lines.append(
            f"  adapter on the base quantized as trained, loaded with plain transformers + peft, vs (a): max |logit diff| {m['max_abs_logit_diff']:.3g}, greedy agreement {m['greedy_agreement']:.4f}"
        )
    if "merge_onto" in report:
        onto = report["merge_onto"]
        lines.append(f"  merged onto the {onto['exported']} weights: {onto['why']}")
        for mode in ONTO:
            m = onto[mode]
            agreement = next(k for k in m if k.endswith("_agreement"))
            lines.append(
                f"    onto {mode}: max |logit diff| to (a) {m['max_abs_logit_diff']:.3g}, {agreement.replace('_', ' ')} {m[agreement]:.4f}, loss {m['loss']:.4f} (as trained {onto['trained']['loss']:.4f})"
            )
    if "merged_export" in report:
        m = report["merged_export"]
        lines.append(
            f"  merged export: {m['weights_mb']} MB of weights in {m['shards']} shard(s), peak memory {m['peak_memory_mb']} MB ({m['peak_memory_kind']})"
        )
    if "gguf" in report:
        from lora_sft.export.gguf import report_line
        from lora_sft.export.gguf_files import serving_line

        lines.append(report_line(report["gguf"]["conversion"]))
        lines += [serving_line(f) for f in report["gguf"]["files"] if "prompts" in f or f.get("problems")]
    return "\n".join(lines)
