"""HF-format folders (config.json + safetensors + tokenizer.json): read and export. (In progress.)"""
