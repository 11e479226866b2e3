"""Load an exported model the way a user would: plain transformers / peft, no lora_sft.

`export` runs this file in a fresh interpreter (`python -I plain_load.py JOB.json`, so neither
lora_sft nor this folder is on the path) to prove each export loads where Hugging Face models load.
JOB.json: kind (causal_lm | classification), model (folder or hub id), adapter (folder or null),
dtype, config_overrides (for a classification base: num_labels, id2label, label2id), inputs (a
safetensors file with input_ids and attention_mask), prompts (token id lists to generate from),
max_new_tokens, out (folder for logits.safetensors and result.json).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cls = AutoModelForSequenceClassification if job["kind"] == "classification" else AutoModelForCausalLM
    model = cls.from_pretrained(job["model"], dtype=DTYPES[job["dtype"]], **job.get("config_overrides", {})).to(device)
    if job.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, job["adapter"])
    model.eval()
    inputs = {k: v.to(device) for k, v in load_file(job["inputs"]).items()}
    out = Path(job["out"])
    result = {}
    with torch.no_grad():
        logits = model(**inputs).logits.float().cpu()
        if job["kind"] == "classification":
            result["predicted"] = logits.argmax(-1).tolist()
        else:
            result["generated"] = []
            for ids in job.get("prompts", []):
                prompt = torch.tensor([ids], device=device)
                new = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=job["max_new_tokens"], do_sample=False)
                result["generated"].append(new[0, len(ids):].tolist())
    save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
    result["lora_sft_imported"] = any(name == "lora_sft" or name.startswith("lora_sft.") for name in sys.modules)
    result["model_class"] = type(model).__name__
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
