"""Hugging Face transformers integration: the files an export carries for
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``."""
