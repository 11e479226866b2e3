"""Load an exported model the way a user would: plain transformers / peft, no lora_sft.

`export` runs this file in a fresh interpreter (`python -I plain_load.py JOB.json`, so neither
lora_sft nor this folder is on the path) to prove each export loads where Hugging Face models load.
JOB.json: kind (causal_lm | classification), dtype, inputs (a safetensors file with input_ids and
attention_mask), prompts (token id lists to generate from), max_new_tokens, and loads: a list of
{model (folder or hub id), adapter (folder or null), resize_to (embedding rows the adapter's added tokens
need, or null), config_overrides (a classification base's
num_labels, id2label, label2id), quantization (a BitsAndBytesConfig as a dict: the base loaded in 4-bit as
trained, or null), generate (false: logits only), out (folder for logits.safetensors and result.json)}. The logits are saved at the unpadded
positions only (causal LMs: a 49k vocabulary makes every position 200 KB), computed ROWS rows at a time.
"""

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROWS = 4


def load_and_run(job: dict[str, Any], load: dict[str, Any], inputs: dict[str, torch.Tensor], device: str) -> None:
    cls = AutoModelForSequenceClassification if job["kind"] == "classification" else AutoModelForCausalLM
    options: dict[str, Any] = dict(load.get("config_overrides", {}))
    if load.get("quantization"):
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig.from_dict(load["quantization"])
    else:
        options["dtype"] = DTYPES[job["dtype"]]
    model = cls.from_pretrained(load["model"], **options)
    # PreTrainedModel.to is wrapped with functools.wraps, which type checkers do not bind as a method
    if not load.get("quantization"):  # a 4-bit model is placed as it loads
        model = model.to(device)  # type: ignore[arg-type]
    if load.get("adapter"):
        from peft import PeftModel

        if load.get("resize_to"):  # the run added special tokens: the base needs rows for them before peft loads
            model.resize_token_embeddings(load["resize_to"])

        model = PeftModel.from_pretrained(model, load["adapter"])
    model.eval()
    result: dict[str, Any] = {"model_class": type(model).__name__}
    with torch.no_grad():
        parts = []
        for start in range(0, len(inputs["input_ids"]), ROWS):
            rows = {k: v[start : start + ROWS] for k, v in inputs.items()}
            out = model(**rows).logits.float().cpu()
            parts.append(out if job["kind"] == "classification" else out[rows["attention_mask"].bool().cpu()])
        logits = torch.cat(parts)
        if job["kind"] == "classification":
            result["predicted"] = logits.argmax(-1).tolist()
        else:
            result["generated"] = []
            for ids in job.get("prompts", []) if load.get("generate", True) else []:
                prompt = torch.tensor([ids], device=device)
                new = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=job["max_new_tokens"],
                    do_sample=False,
                )
                result["generated"].append(new[0, len(ids) :].tolist())
    out = Path(load["out"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
    result["lora_sft_imported"] = any(name == "lora_sft" or name.startswith("lora_sft.") for name in sys.modules)
    (out / "result.json").write_text(json.dumps(result))


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in load_file(job["inputs"]).items()}
    for load in job["loads"]:
        load_and_run(job, load, inputs, device)


if __name__ == "__main__":
    main(sys.argv[1])
