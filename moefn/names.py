"""Names the command line offers before it imports torch (tests check them against the presets).

>>> "deepseek-v3" in MODEL_PRESETS and "hf-deepseek-v3" in HF_PRESET_NAMES
True
"""

from __future__ import annotations

MODEL_PRESETS: tuple[str, ...] = ("tiny", "tiny-full", "tiny-2experts", "tiny-bidirectional",
                                  "tiny-mla", "tiny-kv3", "small", "deepseek-v3", "qwen3-30b-a3b")
HF_PRESET_NAMES: tuple[str, ...] = ("hf-qwen3-30b-a3b", "hf-qwen3-235b-a22b", "hf-mixtral-8x7b",
                                    "hf-deepseek-v3", "hf-olmoe-1b-7b", "hf-qwen1.5-moe-a2.7b",
                                    "hf-gpt-oss-20b", "hf-gpt-oss-120b")
